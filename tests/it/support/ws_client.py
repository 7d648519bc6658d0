"""An off-the-shelf WebSocket client of patchwire's GET /ws: Python `websockets`, with the
documents rebuilt by Python `jsonpatch`. Driven by the Rust test through stdin and stdout, one
JSON command per line, one JSON reply per line (tests/it/support/scripted.rs):

  {"op": "connect", "url": ...}               open a connection
  {"op": "send", "message": {...}, "until": [types]}
                                              send, then read until a message of one of
                                              `types`, which is the reply
  {"op": "converge", "stream": s, "doc": {...}}
                                              read until the rebuilt document of s is doc
  {"op": "drop"}                              close the connection (the documents stay)
  {"op": "state"}                             documents, last ids, snapshot and patch counts

Every event message (snapshot, patch, error, recovered) is applied to its stream's document
as it is read, whatever the command.
"""

import asyncio
import json
import sys

import jsonpatch

try:
    from websockets.asyncio.client import connect
except ImportError:  # websockets < 13
    from websockets import connect

TIMEOUT = 10


class Client:
    def __init__(self):
        self.ws = None
        self.docs, self.last, self.snapshots, self.patches = {}, {}, {}, {}

    def apply(self, message):
        kind, stream = message.get("type"), message.get("stream")
        if kind == "snapshot":
            self.docs[stream] = message["data"]
            self.snapshots[stream] = self.snapshots.get(stream, 0) + 1
        elif kind == "patch":
            self.docs[stream] = jsonpatch.apply_patch(self.docs[stream], message["data"])
            self.patches[stream] = self.patches.get(stream, 0) + 1
        elif kind not in ("error", "recovered"):
            return
        self.last[stream] = message["id"]

    async def read_until(self, done):
        while True:
            message = json.loads(await asyncio.wait_for(self.ws.recv(), TIMEOUT))
            self.apply(message)
            if done(message):
                return message

    async def handle(self, command):
        op = command["op"]
        if op == "connect":
            self.ws = await connect(command["url"])
            return {}
        if op == "send":
            await self.ws.send(json.dumps(command["message"]))
            until = command["until"]
            return await self.read_until(lambda m: m.get("type") in until)
        if op == "converge":
            stream, doc = command["stream"], command["doc"]
            if self.docs.get(stream) != doc:
                await self.read_until(lambda m: self.docs.get(stream) == doc)
            return {}
        if op == "drop":
            await self.ws.close()
            self.ws = None
            return {}
        if op == "state":
            return {
                "docs": self.docs,
                "last": self.last,
                "snapshots": self.snapshots,
                "patches": self.patches,
            }
        raise ValueError("unknown op " + op)


async def main():
    client = Client()
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        try:
            reply = {"ok": await client.handle(json.loads(line))}
        except Exception as error:  # reported to the test, which fails with it
            reply = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(reply), flush=True)


asyncio.run(main())
