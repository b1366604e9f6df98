"""Secret values the tests configure; the suite fails if any of them is ever logged."""

TWILIO_AUTH_TOKEN = "tw-auth-token-0a1b2c3d4e5f60718293"
TWILIO_API_KEY_SECRET = "tw-api-key-secret-5e6f7a8b9c0d"
STREAM_TOKEN_SECRET = "stream-token-secret-9f8e7d6c5b4a39281706"
VAPI_API_KEY = "vapi-private-key-1234abcd5678ef90"
VAPI_WEBHOOK_SECRET = "vapi-webhook-secret-a1b2c3d4e5f6"
ADMIN_TOKEN = "admin-bearer-token-0f9e8d7c6b5a"

ALL = (TWILIO_AUTH_TOKEN, TWILIO_API_KEY_SECRET, STREAM_TOKEN_SECRET, VAPI_API_KEY,
       VAPI_WEBHOOK_SECRET, ADMIN_TOKEN)
