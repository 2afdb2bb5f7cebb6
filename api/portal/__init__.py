"""The customers' privacy portal (``/portal/``): server-rendered pages, local assets."""

from api.portal.controller import (
    PortalController,
    portal_static_router,
    portal_template_config,
)

__all__ = ["PortalController", "portal_static_router", "portal_template_config"]
