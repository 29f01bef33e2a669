"""A Kubernetes API server for the tests, on loopback: serves the pods of a
recorded list and a recorded watch, as the real one does for
`GET /api/v1/pods` (a `PodList`) and `GET /api/v1/pods?watch=true` (a chunked
stream of JSON watch events), so that the agent's real client can be tested.

PODS is a JSON file: {"list": [pod, ...], "watch": [{"after": SECONDS,
"type": "ADDED" | "MODIFIED" | "DELETED", "object": pod}, ...]}. The list is
served at resourceVersion 1; the first watch sends the events, each `after`
seconds after the previous one, then stays open as an idle watch does; later
watches only stay open.

Each request is appended to DIR/requests.jsonl (method, path, query,
authorization header).

Usage: kube_api.py DIR PODS PORT. Prints `listening PORT` once it accepts
connections, and `sent TYPE NAME` once it has sent a watch event.
"""
import argparse
import http.server
import json
import pathlib
import threading
import time
import urllib.parse

# How long an idle watch stays open; the client watches again after it.
IDLE_WATCH_SECONDS = 30


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=pathlib.Path)
    parser.add_argument("pods", type=pathlib.Path)
    parser.add_argument("port", type=int)
    args = parser.parse_args()
    pods = json.loads(args.pods.read_text())
    lock = threading.Lock()
    watched = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            with lock, open(args.dir / "requests.jsonl", "a") as log:
                record = {
                    "method": "GET",
                    "path": url.path,
                    "query": {key: values[0] for key, values in query.items()},
                    "authorization": self.headers.get("Authorization"),
                }
                log.write(json.dumps(record) + "\n")
            if url.path != "/api/v1/pods":
                self.send_json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                                     "reason": "NotFound", "message": f"{url.path} not found"})
            elif query.get("watch") == ["true"]:
                self.watch(not watched.is_set())
                watched.set()
            else:
                self.send_json(200, {"kind": "PodList", "apiVersion": "v1",
                                     "metadata": {"resourceVersion": "1"}, "items": pods["list"]})

        def send_json(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def watch(self, first):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for version, event in enumerate(pods["watch"] if first else [], start=2):
                    time.sleep(event["after"])
                    pod = dict(event["object"])
                    pod["metadata"] = dict(pod["metadata"], resourceVersion=str(version))
                    self.chunk(json.dumps({"type": event["type"], "object": pod}).encode() + b"\n")
                    print(f"sent {event['type']} {pod['metadata']['name']}", flush=True)
                time.sleep(IDLE_WATCH_SECONDS)
                self.chunk(b"")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def chunk(self, data):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
