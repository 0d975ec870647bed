"""Avro values in the Confluent wire format, with Apache Avro's Python implementation: the tests'
independent writer and reader of what the Kafka connectors read and write.

  avro_values.py encode ID SCHEMA_JSON   JSON objects on stdin -> hex-encoded values on stdout
  avro_values.py decode REGISTRY_URL     hex-encoded values on stdin -> JSON objects on stdout

Decoding fetches each writer schema from the registry by the id in the value. Timestamps
(timestamp-millis) come out as epoch milliseconds.
"""
import datetime
import io
import json
import struct
import sys
import urllib.request

import avro.io
import avro.schema


def encode(schema_id, schema_json):
    schema = avro.schema.parse(schema_json)
    writer = avro.io.DatumWriter(schema)
    for line in sys.stdin:
        if not line.strip():
            continue
        buf = io.BytesIO()
        buf.write(struct.pack(">bI", 0, schema_id))
        writer.write(json.loads(line), avro.io.BinaryEncoder(buf))
        print(buf.getvalue().hex())


def plain(v):
    if isinstance(v, datetime.datetime):
        return int(v.timestamp() * 1000)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


def decode(url):
    schemas = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        raw = bytes.fromhex(line.strip())
        magic, schema_id = struct.unpack(">bI", raw[:5])
        assert magic == 0, "not the Confluent wire format"
        if schema_id not in schemas:
            with urllib.request.urlopen(f"{url}/schemas/ids/{schema_id}") as r:
                text = json.load(r)["schema"]
            schemas[schema_id] = avro.io.DatumReader(avro.schema.parse(text))
        buf = io.BytesIO(raw[5:])
        value = schemas[schema_id].read(avro.io.BinaryDecoder(buf))
        assert buf.tell() == len(raw) - 5, "bytes left after the datum"
        print(json.dumps({"schema_id": schema_id, "value": plain(value)}))


if __name__ == "__main__":
    if sys.argv[1] == "encode":
        encode(int(sys.argv[2]), sys.argv[3])
    else:
        decode(sys.argv[2])
