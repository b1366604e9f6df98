"""twistd dropin: makes ``twistd vapi-gateway`` find :mod:`gateway.tap` (imported lazily)."""

from twisted.application.service import ServiceMaker

vapi_gateway = ServiceMaker(
    "vapi-gateway",
    "gateway.tap",
    "Puts a Vapi voice assistant on a Twilio phone number.",
    "vapi-gateway",
)
