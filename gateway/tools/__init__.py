"""Tools that ship with the gateway for operators and developers: running the daemon as
a child process, the demo, and (later) the call simulator and the local assistant."""
