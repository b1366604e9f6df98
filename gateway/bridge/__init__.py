"""The media bridge: one call session per phone call, joining the Twilio and Vapi legs."""
