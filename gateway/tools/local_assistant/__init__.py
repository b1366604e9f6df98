"""The local assistant: a local stand-in for Vapi that speaks the protocol the gateway uses.

``POST /call`` and the call socket (``/<callId>/transport``) on one loopback port,
with scripted behaviours -- ``echo``, ``speak``, ``interrupt``, ``stall``, ``drop``
(with or without ``refuse-reconnect``), ``flap``, ``no-pong``, ``fail-create`` -- so
``make demo`` and the end-to-end tests run whole calls offline, with no credentials. Calls choose a
script by ``assistantId`` ``local:<script>`` (what the gateway's ``[routing]``
table can name per number), by ``assistantOverrides.variableValues.localScript``,
or get the configured default.

Modules:

- :mod:`.script` -- the script language (``speak+interrupt:1500``);
- :mod:`.settings` -- defaults and bounds (:class:`LocalAssistantSettings`);
- :mod:`.call_request` -- validating ``POST /call`` as Vapi would (sans-io);
- :mod:`.scripted_call` -- one call as a schedule of actions at integer-ns times
  (sans-io), and the :class:`CallRecord` of what it received;
- :mod:`.clips` -- the packaged WAV clips, converted to each call's audio format;
- :mod:`.server` -- the Twisted shell: :class:`LocalAssistant` (a ``Service``);
- :mod:`.cli` -- ``vapi-gateway-assistant`` / ``python -m gateway.tools.local_assistant``.

Import from the modules (the package imports nothing, so ``gateway.config`` can use
:mod:`.settings` without a cycle).
"""
