"""A loopback HTTP endpoint that takes requests and never answers: an AWS
endpoint that hangs. It counts the requests it got and when."""
import socket
import threading
import time


class Blackhole:
    def __init__(self):
        self._listener = socket.socket()
        self._listener.bind(('127.0.0.1', 0))
        self._listener.listen(64)
        self.url = f'http://127.0.0.1:{self._listener.getsockname()[1]}'
        self.requests = []            # monotonic time of each request
        self._open = []
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._open.append(conn)
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn):
        buffer = b''
        try:
            conn.settimeout(0.2)
        except OSError:             # stop() closed it first
            return
        while not self._stopped.is_set():
            try:
                chunk = conn.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return                  # the client gave up
            buffer += chunk
            while b'\r\n\r\n' in buffer:
                head, _, buffer = buffer.partition(b'\r\n\r\n')
                length = next((int(line.split(b':')[1]) for line in head.split(b'\r\n')
                               if line.lower().startswith(b'content-length:')), 0)
                buffer = buffer[length:]
                self.requests.append(time.monotonic())

    def stop(self):
        self._stopped.set()
        self._listener.close()
        for conn in self._open:
            try:
                conn.close()
            except OSError:
                pass
