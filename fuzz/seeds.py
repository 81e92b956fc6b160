#!/usr/bin/env python3
"""Writes the small committed seed corpora under fuzz/corpus/ (run from anywhere)."""
import hashlib, json, os, struct, glob

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())

def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF

MAGIC = bytes([0x42, 0x57, 0x53, 0xF7])

def v2(msg_id, payload):
    head = MAGIC + struct.pack("<I", len(payload)) + msg_id + struct.pack("<I", crc32c(payload))
    return head + struct.pack("<I", crc32c(head)) + payload

def v1(msg_id, payload):
    return struct.pack("<I", len(payload)) + struct.pack("<I", crc32c(payload, crc32c(msg_id))) + msg_id + payload

ENV = {"msg_id": "0192f7a0-7c1e-7000-8000-000000000001", "route": "grading",
       "request_id": "magento-123", "created_at": "2026-12-01T10:00:00.000000Z",
       "reason": "timeout", "attempts": 0, "method": "POST", "path": "/v1/grade",
       "query": "course=7", "headers": [["content-type", "application/json"], ["x-student-id", "42"]],
       "body_b64": "eyJlc3NheSI6Ii4uLiJ9", "model_version_requested": None}

# config: the shipped example configs.
for f in sorted(glob.glob(os.path.join(ROOT, "config", "**", "*.toml"), recursive=True)):
    out("config", os.path.basename(f), open(f, "rb").read())
out("config", "minimal.toml", '[upstreams.ai]\nurl = "http://127.0.0.1:9000"\n\n[[routes]]\nname = "r"\npath_prefix = "/"\nupstream = "ai"\n')
out("config", "bad-key.toml", '[server]\nlisten = "127.0.0.1:0"\nnope = 1\n')

# spool: first byte is the drain window knob, the rest a segment.
env = json.dumps(ENV).encode()
out("spool", "v2-three", b"\x07" + v2(b"\x01" * 16, env) + v2(b"\x02" * 16, b"payload-1") + v2(b"\x03" * 16, b""))
bad = bytearray(v2(b"\x01" * 16, b"payload-0") + v2(b"\x02" * 16, b"payload-1") + v2(b"\x03" * 16, b"payload-2"))
bad[len(v2(b"\x01" * 16, b"payload-0")) + 4] ^= 0x08  # a flipped length bit
out("spool", "v2-bad-length", b"\x20" + bytes(bad) + MAGIC + b"\x09\x00")
out("spool", "v1-two", b"\x05" + v1(b"\x07" * 16, b"old-0") + v1(b"\x08" * 16, b"old-1-longer-payload"))
out("spool", "v2-torn", b"\x40" + v2(b"\x04" * 16, b"x" * 40) + v2(b"\x05" * 16, b"y" * 40)[:30])

# audit_line: first byte odd = re-link and re-hash lines before verifying.
def line(rec, prev):
    rec = dict(rec, prev_hash=prev)
    canonical = json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode()
    h = hashlib.sha256(prev.encode() + canonical).hexdigest()
    return canonical[:-1] + b',"hash":"' + h.encode() + b'"}', h

prev = "0" * 64
lines = []
for seq in range(3):
    rec = {"schema_v": 1, "event_id": "0192f7a0-7c1e-7000-8000-00000000000%d" % seq, "seq": seq,
           "ts_start": "2026-12-01T10:00:00.000000Z", "ts_end": "2026-12-01T10:00:00.001000Z",
           "instance": "host-1", "route": "grading", "upstream": "ai", "request_id": "r%d" % seq,
           "method": "POST", "path": "/v1/grade", "outcome": "ai", "status": 200}
    l, prev = line(rec, prev)
    lines.append(l)
ev = {"schema_v": 1, "event_id": "e1", "seq": 3, "ts": "2026-12-01T10:00:01Z", "instance": "host-1",
      "event": "records_lost", "detail": {"count": 7, "dropped_total": 7}}
l, prev = line(ev, prev)
lines.append(l)
out("audit_line", "chain", b"\x00" + b"\n".join(lines) + b"\n")
out("audit_line", "chain-rehash", b"\x01" + b"\n".join(lines) + b"\n")
out("audit_line", "tampered", b"\x00" + lines[0] + b"\n" + lines[1].replace(b"r1", b"r9") + b"\n")
out("audit_line", "garbage", b"\x00{\"seq\":1}\nnot json\n")

# envelope: DLQ messages as the spool and RabbitMQ hold them.
out("envelope", "plain.json", json.dumps(ENV))
e2 = dict(ENV, query=None, headers=[["connection", "x-a"], ["x-a", "1"], ["transfer-encoding", "chunked"],
          ["content-length", "3"], ["X-Request-Id", "dup"], ["idempotency-key", "k"]], body_b64="")
out("envelope", "hop-headers.json", json.dumps(e2))
out("envelope", "bad-body.json", json.dumps(dict(ENV, body_b64="!!", method="G E T", path="http://x/y")))

# headers: flags (1 tls, 2 host line first, 4 IPv6), address, then name:value lines.
out("headers", "plain", b"\x02\x0a\x00\x00\x01shop.example\nx-request-id:magento-123\nx-forwarded-for:10.0.0.1\ncontent-type:application/json\n")
out("headers", "connection", b"\x01\x7f\x00\x00\x01connection:keep-alive, X-Secret\nx-secret:1\nte:trailers\nupgrade:h2c\nkeep-alive:timeout=5\nx-keep:1\n")
out("headers", "v6", b"\x06" + bytes(15) + b"\x01[::1]\nx-forwarded-for:a\nx-forwarded-for:b\nx-forwarded-host:evil\nx-request-id:has space\nhost:x\n")
