"""Loopback servers the tests drive: a DataKit-like receiver and a
fault-injecting HTTP proxy (in front of moto or of the receiver)."""
import gzip
import http.client
import http.server
import json
import re
import threading
import time
import urllib.parse

_SCOPE_RE = re.compile(r'Credential=[^/]+/\d+/([^/]+)/([^/]+)/')


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, *args):
        pass

    def _reply(self, status, body, headers=None):
        self.send_response(status)
        for key, value in (headers or {'Content-Type': 'application/json'}).items():
            if key.lower() not in ('content-length', 'transfer-encoding', 'connection', 'server', 'date'):
                self.send_header(key, value)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that went away (a run cancelled by its timeout shuts its
        # sockets): not an error of the server's, and its traceback would land
        # in whatever test captures stderr next.
        import sys
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Server:
    def _serve(self, handler_class):
        self.stopping = threading.Event()
        self.httpd = _QuietServer(('127.0.0.1', 0), handler_class)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.stopping.set()         # ends the delays of requests in flight
        self.httpd.shutdown()
        self.httpd.server_close()


class DataKitReceiver(_Server):
    """Answers like DataKit. `script` is a list of responses used one per
    request, then 200s: an int status, ('slow', seconds), 'close', or
    ('raw', status, body[, headers]) for an answer that is not DataKit's."""

    def __init__(self, script=None):
        self.script = list(script or [])
        self.requests = []          # (path, query, headers, lines) of accepted writes
        self.bodies = []            # the text of each accepted write, as it came
        self.attempts = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(_QuietHandler):
            def do_GET(self):
                self._reply(200, b'{"content":"pong"}') if self.path.startswith('/v1/ping') else self._reply(404, b'')

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
                with outer.lock:
                    outer.attempts += 1
                    action = outer.script.pop(0) if outer.script else 200
                if action == 'close':
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if isinstance(action, tuple) and action[0] == 'slow':
                    time.sleep(action[1])
                    action = 200
                if isinstance(action, tuple) and action[0] == 'reject_names':
                    text = _decode(self.headers, body)
                    if any(f'name={n}' in text for n in action[1]):
                        return self._reply(400, json.dumps({
                            'error_code': 'datakit.invalidLinePoint',
                            'message': 'invalid line protocol'}).encode())
                    action = 200
                if action == 200:
                    url = urllib.parse.urlsplit(self.path)
                    text = _decode(self.headers, body)
                    with outer.lock:
                        outer.requests.append((url.path, dict(urllib.parse.parse_qsl(
                            url.query, keep_blank_values=True)), dict(self.headers), text.splitlines()))
                        outer.bodies.append(text)
                    return self._reply(200, b'{}')
                if isinstance(action, tuple) and action[0] == 'raw':      # ('raw', status, body, headers)
                    return self._reply(action[1], action[2].encode(), action[3] if len(action) > 3 else {})
                if action == 400:
                    return self._reply(400, json.dumps({'error_code': 'datakit.invalidLinePoint',
                                                        'message': 'invalid field'}).encode())
                self._reply(action, b'{"error_code":"datakit.busy","message":"try later"}')

        self._serve(Handler)

    @property
    def lines(self):
        with self.lock:
            return [line for *_, lines in self.requests for line in lines]

    def names(self):
        """The `name` tag of every point received (at least once)."""
        out = []
        for line in self.lines:
            series = re.split(r'(?<!\\) ', line, maxsplit=1)[0]   # up to the first unescaped space
            match = re.search(r',name=((?:\\.|[^,\s])+)', series)
            if match:
                out.append(match.group(1))
        return out


def _decode(headers, body):
    if headers.get('Content-Encoding') == 'gzip':
        body = gzip.decompress(body)
    return body.decode('utf-8')


class FaultProxy(_Server):
    """A reverse proxy to `upstream` that applies `rule(request) -> fault` to
    each request. A request is a dict: method, path, region, service, action,
    body. A fault is None (pass), ('status', code, body), 'reset',
    ('delay', seconds), or 'truncate' (half of the upstream's body)."""

    def __init__(self, upstream, rule=None):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.rule = rule or (lambda request: None)
        self.seen = []
        self.faults = []
        self.lock = threading.Lock()
        outer = self

        class Handler(_QuietHandler):
            def _handle(self):
                body = self.rfile.read(int(self.headers.get('Content-Length', 0) or 0))
                scope = _SCOPE_RE.search(self.headers.get('Authorization', ''))
                params = dict(urllib.parse.parse_qsl(body.decode('utf-8', 'replace'))) if body else {}
                key = re.search(r'Credential=([A-Z0-9]+)/', self.headers.get('Authorization', ''))
                request = {'method': self.command, 'path': self.path, 'body': body,
                           'access_key': key.group(1) if key else None,
                           'region': scope.group(1) if scope else None,
                           'service': scope.group(2) if scope else None,
                           # Query protocols: the body's Action; JSON ones: X-Amz-Target's.
                           'action': params.get('Action') or (
                               self.headers.get('X-Amz-Target') or '').rpartition('.')[2] or None}
                with outer.lock:
                    outer.seen.append(request)
                    fault = outer.rule(request)
                    if fault:
                        outer.faults.append((request, fault))
                if fault == 'reset':
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if isinstance(fault, tuple) and fault[0] == 'status':
                    body = fault[2] if isinstance(fault[2], bytes) else fault[2].encode()
                    return self._reply(fault[1], body, {})
                if isinstance(fault, tuple) and fault[0] == 'delay':
                    if outer.stopping.wait(fault[1]):
                        self.close_connection = True
                        return
                status, headers, data = outer._forward(self.command, self.path, self.headers, body)
                if fault == 'truncate':
                    self.send_response(status)
                    self.send_header('Content-Length', str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:len(data) // 2])
                    self.close_connection = True
                    return
                self._reply(status, data, headers)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self._serve(Handler)

    def _forward(self, method, path, headers, body):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            forwarded = {k: v for k, v in headers.items() if k.lower() not in ('connection',)}
            conn.request(method, path, body=body, headers=forwarded)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()


def cloudwatch_error(code, message):
    """A CloudWatch error body in the protocol this botocore speaks to it:
    the query protocol's XML (botocore before 1.38, Func's), JSON, or Smithy
    RPC v2 CBOR (a map of "__type" and "message")."""
    import botocore.session
    model = botocore.session.Session().get_service_model('cloudwatch')
    protocol = getattr(model, 'resolved_protocol', model.protocol)
    if protocol == 'query':
        return (f'<ErrorResponse xmlns="http://monitoring.amazonaws.com/doc/2010-08-01/"><Error>'
                f'<Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>'
                '<RequestId>test</RequestId></ErrorResponse>')
    if protocol == 'json':
        return json.dumps({'__type': code, 'message': message})

    def text(value):            # a CBOR text string (major type 3)
        data = value.encode()
        size = len(data)
        head = (bytes([0x60 + size]) if size < 24 else bytes([0x78, size]) if size < 256
                else bytes([0x79]) + size.to_bytes(2, 'big'))
        return head + data
    return b'\xa2' + text('__type') + text(code) + text('message') + text(message)


def ec2_error(code, message):
    """An EC2 error body as AWS sends it."""
    return (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
            f'<Message>{message}</Message></Error></Errors><RequestID>test</RequestID></Response>')
