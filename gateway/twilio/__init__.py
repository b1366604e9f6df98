"""The Twilio leg: signed webhooks, TwiML, the Media Streams server and the REST client."""
