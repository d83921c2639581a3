"""InfluxDB 1.x (Debian's influxdb) started on loopback with a throw-away
config: the real line-protocol parser the round-trip tests write through."""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

CONFIG = """
reporting-disabled = true
bind-address = "127.0.0.1:{rpc}"
[meta]
  dir = "{root}/meta"
[data]
  dir = "{root}/data"
  wal-dir = "{root}/wal"
  query-log-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{http}"
  log-enabled = false
  max-body-size = 0
[monitor]
  store-enabled = false
[subscriber]
  enabled = false
[continuous_queries]
  enabled = false
"""


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Influx:
    def __init__(self):
        self.root = tempfile.mkdtemp(prefix='influx-test-')
        self.port = _free_port()
        config = os.path.join(self.root, 'influxdb.conf')
        with open(config, 'w') as f:
            f.write(CONFIG.format(root=self.root, rpc=_free_port(), http=self.port))
        self.url = f'http://127.0.0.1:{self.port}'
        self.log = open(os.path.join(self.root, 'influxd.log'), 'w')
        self.proc = subprocess.Popen(['influxd', '-config', config], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + '/ping', timeout=1)
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError('influxd exited: ' + open(self.log.name).read()[-2000:])
                time.sleep(0.1)
        else:
            raise RuntimeError('influxd did not start in 30 s')
        self.query('CREATE DATABASE test')

    def write(self, body):
        req = urllib.request.Request(self.url + '/write?db=test&precision=ns', data=body.encode(),
                                     method='POST')
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, ''
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def query(self, q):
        url = self.url + '/query?' + urllib.parse.urlencode({'db': 'test', 'q': q, 'epoch': 'ns'})
        req = urllib.request.Request(url, data=b'', method='POST')
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def rows(self, measurement):
        """Every row of `measurement` as a dict of column -> value."""
        escaped = measurement.replace('\\', '\\\\').replace('"', '\\"')
        result = self.query(f'SELECT * FROM "{escaped}"')['results'][0]
        out = []
        for series in result.get('series', []):
            for values in series['values']:
                out.append(dict(zip(series['columns'], values)))
        return out

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)
