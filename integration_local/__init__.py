"""The local runtime: runs the startup scripts of the integration set outside
DataFlux Func, on any machine or in a container. Never pasted into Func.

    runtime   a stand-in for Func's DFF (API, SRC/CONN, CACHE, ENV) and the
              DataKit HTTP client it writes through;
    cli       `integration-runner run|serve|check|demo` (also
              `python -m integration_core__runner`);
    emulator  the demo's and the tests' embedded AWS (moto) and test IMDS.

What is pasted into Func (the Runner, the auth module, the collectors) lives
in the top-level `integration_*` modules.
"""
