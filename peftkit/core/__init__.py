"""The method-agnostic core: Delta (math at a site), Site (the wrapper), injection, the host."""
from .method import Delta, Method, UnsupportedSite
from .registry import get_method, register_method, registered_methods
from .site import Site, adapter_routing

__all__ = [
    "Delta", "Method", "UnsupportedSite", "Site", "adapter_routing",
    "get_method", "register_method", "registered_methods",
]
