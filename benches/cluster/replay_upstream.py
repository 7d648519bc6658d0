#!/usr/bin/env python3
"""A recorded feed as an upstream: every GET answers the next file of a directory (sorted by
name), cycling, so a stream polling it sees the recorded polls over and over.

    replay_upstream.py DIR PORT      # serves on 127.0.0.1:PORT until killed
"""
import http.server
import itertools
import pathlib
import sys
import threading


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    directory, port = pathlib.Path(sys.argv[1]), int(sys.argv[2])
    bodies = [p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()]
    if not bodies:
        print(f"error: no files in {directory}", file=sys.stderr)
        return 2
    polls = itertools.cycle(bodies)
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 (the stdlib's name)
            with lock:
                body = next(polls)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"serving {len(bodies)} files of {directory} cycled on 127.0.0.1:{port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
