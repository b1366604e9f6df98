"""The Vapi leg: call creation, the call-socket client, server-URL webhooks and the link
state machine."""
