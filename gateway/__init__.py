"""vapi-gateway: puts a Vapi voice assistant on a Twilio phone number.

The package is laid out by architecture:

- ``gateway.twilio``  -- the Twilio leg (webhooks, TwiML, Media Streams, REST);
- ``gateway.vapi``    -- the Vapi leg (call creation, call socket, webhooks, link state);
- ``gateway.audio``   -- the audio core (G.711, resampling, jitter buffer and playout);
- ``gateway.bridge``  -- call sessions joining the two legs;
- top-level modules   -- the daemon: config, logs, health, drain, systemd, twistd glue.
"""

__version__ = "0.1.0"
