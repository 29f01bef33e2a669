"""Profile intakes for the tests, on loopback or a Unix socket:

- Pyroscope's `POST /ingest` (query: name, from, until, format, sampleRate,
  spyName; multipart body with `profile` and `sample_type_config`);
- the Datadog agent's `POST /profiling/v1/input` (multipart body with an
  `event` JSON and the pprof it names in `attachments`), which the Blackfire
  agent also takes;
- an OpenTelemetry Collector's `POST /v1development/profiles` (an OTLP
  `ExportProfilesServiceRequest`, decoded with the official protos of the
  `opentelemetry-proto` package: run this with the tools' Python).

Each upload is saved in DIR as `NNNN.json` (path, query, headers, the parts'
names, the sample type config or the event; for OTLP, the resource and per
profile its sample type and the value of each function, summed over the
stacks it is in) and `NNNN.pprof` (the profile part as sent). Each file
appears whole (written aside, then renamed), the `.json` last, so that a test
that reads the directory while uploads arrive never reads half a record.

Usage: intake.py DIR (PORT | --unix PATH) [--fail-first N] [--hang-first N].
Prints `listening PORT` (or `listening PATH`) once it accepts connections.
The first N uploads get a 503, as from a backend that is starting; with
`--hang-first`, the first N wait 5 s and get nothing, as from a backend that
hangs.
"""
import argparse
import email.parser
import email.policy
import http.server
import json
import pathlib
import socketserver
import time
import urllib.parse



def save(path, data):
    """Writes `path` whole: aside first, then renamed into place."""
    aside = path.with_name(f".{path.name}.part")
    aside.write_bytes(data)
    aside.rename(path)

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=pathlib.Path)
    parser.add_argument("port", type=int, nargs="?", default=0)
    parser.add_argument("--unix", type=pathlib.Path)
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--hang-first", type=int, default=0)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    state = {"requests": 0, "saved": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            url = urllib.parse.urlsplit(self.path)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state["requests"] += 1
            if url.path not in ("/ingest", "/profiling/v1/input", "/v1development/profiles"):
                return self.answer(404, b"not found")
            if state["requests"] <= args.hang_first:
                time.sleep(5)
                self.close_connection = True
                return
            if state["requests"] <= args.fail_first:
                return self.answer(503, b"starting")
            if url.path == "/v1development/profiles":
                return self.otlp(body)
            message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body
            )
            parts = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                     for part in message.iter_parts()}
            number = state["saved"]
            state["saved"] += 1
            event = json.loads(parts.get("event") or b"{}")
            attachments = event.get("attachments") or ["profile"]
            record = {
                "path": url.path,
                "event": event,
                "query": dict(urllib.parse.parse_qsl(url.query)),
                "authorization": self.headers.get("Authorization"),
                "tenant": self.headers.get("X-Scope-OrgID"),
                "parts": sorted(parts),
                "sample_type_config": json.loads(parts.get("sample_type_config") or b"{}"),
            }
            save(args.dir / f"{number:04}.pprof", parts.get(attachments[0]) or b"")
            save(args.dir / f"{number:04}.json", json.dumps(record).encode())
            self.answer(200, b"")

        def otlp(self, body):
            from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2

            request = profiles_service_pb2.ExportProfilesServiceRequest.FromString(body)
            dictionary = request.dictionary
            strings = dictionary.string_table

            def function_names(stack_index):
                stack = dictionary.stack_table[stack_index]
                for location_index in stack.location_indices:
                    for line in dictionary.location_table[location_index].lines:
                        yield strings[dictionary.function_table[line.function_index].name_strindex]

            record = {"path": "/v1development/profiles", "resources": []}
            for resource_profiles in request.resource_profiles:
                resource = {kv.key: kv.value.string_value for kv in resource_profiles.resource.attributes}
                profiles = []
                for scope in resource_profiles.scope_profiles:
                    for profile in scope.profiles:
                        functions = {}
                        for sample in profile.samples:
                            for name in set(function_names(sample.stack_index)):
                                functions[name] = functions.get(name, 0) + sum(sample.values)
                        profiles.append({
                            "type": strings[profile.sample_type.type_strindex],
                            "unit": strings[profile.sample_type.unit_strindex],
                            "time_unix_nano": profile.time_unix_nano,
                            "samples": len(profile.samples),
                            "functions": functions,
                        })
                resource_entry = {"attributes": resource, "profiles": profiles}
                record["resources"].append(resource_entry)
            number = state["saved"]
            state["saved"] += 1
            save(args.dir / f"{number:04}.json", json.dumps(record).encode())
            self.answer(200, b"")

        def answer(self, status, text):
            self.send_response(status)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            if text:
                self.wfile.write(text)

        def log_message(self, *_):
            pass

    if args.unix:
        class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        class UnixHandler(Handler):
            # A Unix socket's peer has no (host, port).
            def address_string(self):
                return "unix"

        server = UnixServer(str(args.unix), UnixHandler)
        print("listening", args.unix, flush=True)
    else:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
        print("listening", server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
