"""`integration-runner`: the startup scripts of the integration set on any
machine (also `python -m integration_core__runner`).

    integration-runner run SCRIPT [--datakit URL | --output -|FILE] [--force]
    integration-runner check SCRIPT
    integration-runner serve SCRIPT
    integration-runner demo

A startup script runs as in Func: DFF is a global (the local stand-in of
integration_local.runtime), its @DFF.API functions are what runs, each within
its timeout. Exit status: 0 all collected and delivered, 1 something failed,
2 a mistake in the script, its dicts or the command line.
"""
import argparse
import contextlib
import datetime
import fcntl
import hashlib
import importlib.abc
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
import traceback
import urllib.parse

import integration_core__runner as core
from integration_core__runner import ConfigError, RunFailed, _RUNTIME, _one_line
from integration_local.runtime import DEFAULT_DATAKIT_URL, LineProtocolWriter, LocalDFF, install

LOG = logging.getLogger('integration.local')

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class JobTimeout(BaseException):
    """A run past its @DFF.API timeout; like Func's TaskTimeout, `except
    Exception` can't catch it."""


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.handler(args)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        if args.verbose > 1:
            traceback.print_exc()
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line, like every other mistake."""

    def error(self, message):
        self.exit(EXIT_USAGE, f'error: {message} (see {self.prog} --help)\n')


def _parser():
    parser = _ArgumentParser(
        prog='integration-runner',
        description='Run DataFlux Func startup scripts of the integration set on this machine.')
    sub = parser.add_subparsers(dest='command', required=True)

    def command(name, handler, help_text, script=True):
        p = sub.add_parser(name, help=help_text, description=help_text)
        if script:
            p.add_argument('script', help='a startup script, as pasted into Func')
            p.add_argument('--func', help='the @DFF.API function to run (default: every one)')
        p.add_argument('-v', '--verbose', action='count', default=0,
                       help='more log (-vv also shows tracebacks); never secrets')
        p.set_defaults(handler=handler)
        return p

    run = command('run', _cmd_run, 'run the script\'s @DFF.API function(s) once')
    _add_target(run)
    run.add_argument('--force', action='store_true',
                     help='collect even if the last collection is under 15 minutes old')
    serve = command('serve', _cmd_serve, 'run each @DFF.API function on its fixed_crontab')
    _add_target(serve)
    command('check', _cmd_check, 'show the identity and each region\'s access; write nothing')
    command('demo', _cmd_demo, 'run the four startup scripts against an embedded AWS emulator',
            script=False)
    return parser


def _add_target(p):
    target = p.add_mutually_exclusive_group()
    target.add_argument('--datakit', metavar='URL',
                        help=f'DataKit to write to (default $DATAKIT_URL or {DEFAULT_DATAKIT_URL})')
    target.add_argument('--output', metavar='-|FILE', help='print line protocol instead of writing')


def _setup_logging(verbose):
    """The run's log lines on the console, as Func's task log shows them."""
    root = logging.getLogger('integration')
    if not any(core._ours(h) for h in root.handlers):
        root.addHandler(core.PrintHandler())
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    core.quiet_sdk_loggers()


def load_script(path, dff):
    """Exec a startup script as Func would: DFF a global, and the modules of
    the integration set importable by name. The script's folder is not put on
    sys.path: a file there named like a library module (org.py, secrets.py,
    copy.py) would replace that module for everything, the standard library
    included. Only the integration set's names are looked up there (see
    _SiblingFinder), as Func looks up only script ids."""
    if not os.path.isfile(path):
        raise ConfigError(f'{path}: no such startup script')
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f'{path}: not UTF-8 text (byte {e.start}): save the startup script '
                          'as UTF-8, as Func keeps it') from None
    except OSError as e:
        raise ConfigError(f'{path}: cannot read the startup script: {e.strerror}') from None
    folder = os.path.dirname(os.path.abspath(path))
    _warn_if_shadowing(path)
    _SiblingFinder.install([folder, os.path.dirname(os.path.abspath(core.__file__))])
    try:
        code = compile(source, path, 'exec')
    except SyntaxError as e:
        raise ConfigError(f'{path}:{e.lineno}: syntax error: {e.msg}') from None
    namespace = {'DFF': dff, '__name__': '__dff_script__', '__file__': path}
    install(dff)
    try:
        exec(code, namespace)
    except ConfigError as e:
        raise ConfigError(f'{path}: {e}') from None
    except Exception as e:
        raise ConfigError(f'{path}: the script failed while loading: {_one_line(e)} '
                          f'(line {_script_line(e, path)}); fix it and run again') from None
    if not dff.apis:
        raise ConfigError(f'{path}: no function decorated with @DFF.API(...): nothing to run')
    return dff.apis


class _SiblingFinder(importlib.abc.MetaPathFinder):
    """Finds the integration set's modules (names with `__`, as Func's script
    ids, and `integration_*`) in the startup script's folder first, as Func
    finds scripts; every other name goes to the normal import system."""

    folders = []

    @classmethod
    def install(cls, folders):
        for folder in folders:
            if folder not in cls.folders:
                cls.folders.append(folder)
        if not any(isinstance(f, cls) for f in sys.meta_path):
            sys.meta_path.insert(0, cls())

    def find_spec(self, name, path=None, target=None):
        if '.' in name or name.startswith('_') or not (
                '__' in name or name.startswith('integration_')):
            return None
        for folder in self.folders:
            candidate = os.path.join(folder, name + '.py')
            if os.path.isfile(candidate):
                return importlib.util.spec_from_file_location(name, candidate)
        return None


def _warn_if_shadowing(path):
    """A script named like a module (secrets.py) runs fine here, but is not
    importable under its name: say so once, so nobody relies on it."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if not stem.isidentifier():
        return
    try:
        spec = importlib.util.find_spec(stem)
    except (ImportError, ValueError):
        return
    if spec is not None and spec.origin and os.path.abspath(spec.origin) != os.path.abspath(path):
        LOG.warning('[Func] %s has the name of the module %r (%s): the script runs, but '
                    '`import %s` anywhere means that module, never this file; a name of its '
                    'own, such as my_%s.py, avoids confusion', path, stem, spec.origin, stem, stem)


def _script_line(error, path):
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename == path:
            return frame.lineno
    return '?'


def _select(apis, name, path):
    if name is None:
        return apis
    if not name.strip():
        raise ConfigError(f'--func is empty: name one of the @DFF.API functions of {path} ('
                          + ', '.join(a['name'] for a in apis) + '), or leave --func out to run every one')
    chosen = [a for a in apis if a['name'] == name]
    if not chosen:
        raise ConfigError(f'{path}: no @DFF.API function named {name!r}; it has: '
                          + ', '.join(a['name'] for a in apis))
    return chosen


def _local_dff(args):
    url = getattr(args, 'datakit', None)
    if url is not None:
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port      # a port that is not a number raises here
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ('http', 'https') or not parts.netloc:
            raise ConfigError(f'--datakit {url!r} is not a URL: give DataKit\'s address, '
                              f'e.g. {DEFAULT_DATAKIT_URL}')
    output = None
    if getattr(args, 'output', None) is not None and not args.output.strip():
        raise ConfigError("--output is empty: give a file to write line protocol to, or - for the screen")
    if getattr(args, 'output', None):
        if args.output == '-':
            output = LineProtocolWriter(sys.stdout, 'stdout')
        else:
            try:
                output = LineProtocolWriter(open(args.output, 'a', encoding='utf-8'), args.output)
            except OSError as e:
                raise ConfigError(f'--output {args.output}: cannot write there ({e.strerror}): give '
                                  "a file in a folder that exists, or - for the screen") from None
    return LocalDFF(datakit_url=getattr(args, 'datakit', None), output=output)


def _cmd_run(args):
    _RUNTIME['force'] = args.force
    dff = _local_dff(args)
    apis = _select(load_script(args.script, dff), args.func, args.script)
    status = EXIT_OK
    with _script_lock(args.script):
        for api in apis:
            status = max(status, run_api(api, verbose=args.verbose))
    return status


def run_api(api, verbose=0):
    """Run one @DFF.API function with its timeout; the exit status it earns."""
    LOG.info('[Func] %s: %s()', api['title'], api['name'])
    try:
        with _alarm(api['timeout']):
            api['func']()
    except JobTimeout:
        LOG.error('[Func] %s: stopped after its timeout of %d s', api['title'], api['timeout'])
        return EXIT_FAILED
    except RunFailed as e:
        LOG.error('[Func] %s failed: %s', api['title'], e)
        return EXIT_FAILED
    except ConfigError as e:
        print(f"error: {api['title']}: {e}", file=sys.stderr)
        if verbose > 1:
            traceback.print_exc()
        return EXIT_USAGE
    except Exception as e:
        LOG.error('[Func] %s failed: %s', api['title'], _one_line(e))
        if verbose > 1:
            traceback.print_exc()
        return EXIT_FAILED
    return EXIT_OK


@contextlib.contextmanager
def _alarm(seconds):
    """Func kills a run past its timeout; SIGALRM does the same here."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise JobTimeout()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _script_lock(path):
    """Two runs of one script at once: the second waits for the first."""
    digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]
    lock_path = os.path.join(core.state_dir(), 'locks', digest + '.lock')
    core._makedirs(os.path.dirname(lock_path))
    with open(lock_path, 'a') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            LOG.warning('[Func] another run of %s is in progress; waiting for it', path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _cmd_check(args):
    dff = _local_dff(args)
    apis = _select(load_script(args.script, dff), args.func, args.script)
    _RUNTIME['mode'] = 'check'
    try:
        for api in apis:
            LOG.info('[Func] %s: checking', api['title'])
            api['func']()
    finally:
        _RUNTIME.pop('mode', None)
    rows = _RUNTIME.pop('check_rows', [])
    return EXIT_OK if rows and not any(r[2] == 'FAIL' for r in rows) else EXIT_FAILED


def _cmd_serve(args, clock=time.time, stop=None):
    dff = _local_dff(args)
    apis = _select(load_script(args.script, dff), args.func, args.script)
    for api in apis:
        if not api['fixed_crontab']:
            raise ConfigError(f"{args.script}: @DFF.API({api['title']!r}) has no fixed_crontab to serve")
    return Scheduler(apis, verbose=args.verbose, clock=clock, stop=stop).serve()


class Scheduler:
    """Func's scheduling: each job on its crontab, matched once a minute; a job
    whose previous run is still going is skipped; a run past its timeout is
    killed. Each run is a child process, so a hung run cannot hang the rest."""

    def __init__(self, apis, verbose=0, clock=time.time, stop=None, tick=1.0, grace=30.0):
        import croniter
        self.apis = apis
        self.verbose = verbose
        self.clock = clock
        self.stop = stop or threading.Event()
        self.tick = tick
        self.grace = grace
        self.running = {}
        self.next_fire = {}
        self.croniter = croniter.croniter
        self.history = []   # (name, event) for tests and the log

    def serve(self):
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, lambda *_: self.stop.set())
        for api in self.apis:
            self.next_fire[api['name']] = self._next(api, self.clock())
            LOG.info('[serve] %s: %s, next run at %s', api['title'], api['fixed_crontab'],
                     _fmt_epoch(self.next_fire[api['name']]))
        try:
            while not self.stop.is_set():
                now = self.clock()
                self._reap()
                for api in self.apis:
                    due = self.next_fire[api['name']]
                    if now >= due:
                        self.next_fire[api['name']] = self._next(api, now)
                        self._fire(api, due)      # the tick it was scheduled for
                self.stop.wait(self.tick)
        finally:
            self._drain()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return EXIT_OK

    def _drain(self):
        """Stopping: let running jobs finish (up to `grace` seconds), like a
        worker shutting down warm, then terminate what is left."""
        LOG.info('[serve] stopping%s', f', waiting up to {self.grace:g} s for '
                 f'{len(self.running)} running job(s)' if self.running else '')
        deadline = time.monotonic() + self.grace
        for name, (proc, _) in self.running.items():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                LOG.warning('[serve] %s: still running after the %g s grace period; killed',
                            name, self.grace)
                proc.kill()          # it ignores SIGTERM (see _child_run)
                proc.join(10)
                self.history.append((name, 'killed at shutdown'))
            else:
                LOG.info('[serve] %s: finished during shutdown (exit %s)', name, proc.exitcode)
                self.history.append((name, f'exit {proc.exitcode}'))

    def _next(self, api, now):
        return self.croniter(api['fixed_crontab'], now).get_next(float)

    def _fire(self, api, now):
        import multiprocessing
        name = api['name']
        if name in self.running:
            LOG.warning('[serve] %s: previous run not finished; skipping this tick', api['title'])
            self.history.append((name, 'skipped'))
            return
        proc = multiprocessing.get_context('fork').Process(
            target=_child_run, args=(api, self.verbose, now), daemon=True)
        proc.start()
        # A duration, so measured on the monotonic clock, not the schedule's.
        self.running[name] = (proc, time.monotonic() + api['timeout'])
        self.history.append((name, 'started'))

    def _reap(self):
        now = time.monotonic()
        for name, (proc, deadline) in list(self.running.items()):
            if not proc.is_alive():
                proc.join()
                self.history.append((name, f'exit {proc.exitcode}'))
                del self.running[name]
            elif now > deadline:
                LOG.error('[serve] %s: killed after its timeout', name)
                proc.kill()
                proc.join()
                self.history.append((name, 'killed'))
                del self.running[name]


def _child_run(api, verbose, trigger_time=None):
    # A Ctrl-C or a systemd stop reaches the whole process group. The running
    # job ignores it and finishes within the parent's grace period; the parent
    # kills it if it is still running then.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The tick this run was scheduled for, as Func passes its trigger time.
    _RUNTIME['trigger_time'] = trigger_time
    sys.exit(run_api(api, verbose))


def _fmt_epoch(value):
    return datetime.datetime.fromtimestamp(value).strftime('%Y-%m-%d %H:%M:%S')


def _cmd_demo(args):
    try:
        from integration_local import emulator
    except ImportError as e:
        raise ConfigError(f'the demo needs the emulator: pip install ".[demo]" ({e})') from None
    return emulator.run_demo(verbose=args.verbose)


if __name__ == '__main__':
    sys.exit(main())
