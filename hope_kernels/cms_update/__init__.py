"""``cms_update``: one Continuum Memory System level update from a filled buffer of C tokens."""
from hope_kernels.cms_update.interface import OP, CMSCall, cms_update
from hope_kernels.cms_update.naive import CMSParams, CMSStats, cms_forward, cms_update_naive, rmsnorm

__all__ = ["cms_update", "CMSParams", "CMSStats", "CMSCall", "cms_forward", "cms_update_naive", "rmsnorm", "OP"]
