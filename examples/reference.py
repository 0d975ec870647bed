#!/usr/bin/env python3
"""Independent reference model of the worked examples.

Computes each example's expected output from its input files with a deliberately simple, serial,
record-at-a-time model of the semantics documented in ARCHITECTURE.md and the operator docs:
watermark = max event time seen - bound - 1 ms, emitted when it has advanced by >= 200 ms, and
every record judged against the watermark emitted before it; windows fire at end - 1; records
later than end - 1 + allowed lateness for every window they belong to go to the late output;
deduplication, CDC upserts and the interval join as documented. It shares no code with the engine.

    python3 examples/reference.py              # rewrites examples/*/expected/*.jsonl
    python3 examples/reference.py --out DIR    # writes DIR/<example>/*.jsonl instead
"""
import json
import os
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = None  # set by --out
MIN, MAX = float("-inf"), float("inf")


def ts_parse(v):
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        d = datetime.fromisoformat(v.replace("Z", "+00:00"))
        if d.tzinfo is None:
            raise ValueError
        return int(d.timestamp() * 1000)
    raise ValueError


def ts_format(ms):
    d = datetime.fromtimestamp(ms // 1000, tz=timezone.utc)
    return d.strftime("%Y-%m-%dT%H:%M:%S") + ".%03dZ" % (ms % 1000)


def check(kind, v):
    if v is None:
        return None
    ok = {
        "string": isinstance(v, str),
        "int": isinstance(v, int) and not isinstance(v, bool),
        "float": isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "json": True,
    }
    if kind == "timestamp":
        return ts_parse(v)
    if not ok[kind]:
        raise ValueError
    return float(v) if kind == "float" else v


def read(example, file, schema, event_time=None):
    """Decodes a JSON Lines file: (records, dead letters). A record is (fields dict, time)."""
    records, dead = [], []
    with open(os.path.join(HERE, example, file)) as f:
        for no, line in enumerate(f, 1):
            text = line.rstrip("\n")
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
                if not isinstance(obj, dict):
                    raise ValueError
                rec = {k: check(t, obj[k]) for k, t in schema.items()}
            except (ValueError, KeyError, TypeError):
                dead.append({"origin": example_source(example, file), "position": f"{file}:{no}", "record": text})
                continue
            t = rec[event_time] if event_time else 0
            if t is None:
                dead.append({"origin": example_source(example, file), "position": f"{file}:{no}", "record": None})
                continue
            records.append((rec, t))
    return records, dead


def example_source(example, file):
    return file.rsplit(".", 1)[0] if example != "unique-visitors" else "clicks"


def with_watermarks(records, bound_ms, interval_ms=200):
    """[(record, time, watermark the record is judged against)], and the watermark after all."""
    out, max_ts, emitted = [], MIN, MIN
    for rec, t in records:
        out.append((rec, t, emitted))
        if t > max_ts:
            max_ts = t
            cand = max_ts - bound_ms - 1
            if emitted == MIN or cand >= emitted + interval_ms:
                emitted = cand
    return out


def dedup_first(stream, key, ttl_ms):
    seen, out, late = {}, [], []
    for rec, t, wm in stream:
        if wm >= t + ttl_ms:
            late.append(rec)
            continue
        k = tuple(rec[c] for c in key)
        if k in seen and not wm >= seen[k] + ttl_ms:
            continue
        seen[k] = t
        out.append((rec, t, wm))
    return out, late


def windows(stream, key, size, slide, lateness, agg):
    """Sliced windows as documented: returns (final rows by (key, start, end), late records)."""
    slices, fired, table, late = {}, set(), {}, []
    events = []
    for rec, t, wm in stream:
        events.append(("rec", rec, t, wm))

    def emit(k, end):
        vals = []
        for s in range(end - size, end, slide):
            vals.extend(slices.get((k, s), []))
        if vals:
            table[(k, end - size, end)] = agg(vals)

    cur = MIN
    for _, rec, t, wm in events:
        # windows whose end - 1 the watermark before this record reached have fired
        if wm > cur:
            cur = wm
            for (k, s) in sorted(slices):
                for end in range(s + slide, s + size + 1, slide):
                    if end - 1 <= cur and (k, end) not in fired:
                        fired.add((k, end))
                        emit(k, end)
        k = tuple(rec[c] for c in key)
        s = t - t % slide
        if wm >= s + size - 1 + lateness:
            late.append(rec)
            continue
        slices.setdefault((k, s), []).append(rec)
        for end in range(s + slide, s + size + 1, slide):
            if wm >= end - 1:
                fired.add((k, end))
                if wm < end - 1 + lateness:
                    emit(k, end)
    for (k, s) in sorted(slices):
        for end in range(s + slide, s + size + 1, slide):
            if (k, end) not in fired:
                fired.add((k, end))
                emit(k, end)
    return table, late


def sessions(stream, key, gap, agg):
    """Session windows without lateness as documented: a record merges the key's open sessions
    that overlap [t, t + gap) into one; a session fires, and closes, once the watermark reaches
    its end - 1; a record with t + gap - 1 at or behind the watermark is late. Returns (rows as
    (key, start, end, aggregate), late records)."""
    open_, rows, late, cur = {}, [], [], MIN

    def fire(wm):
        for k in sorted(open_):
            keep = []
            for s in open_[k]:
                if s[1] - 1 <= wm:
                    rows.append((k, s[0], s[1], agg(s[2])))
                else:
                    keep.append(s)
            open_[k] = keep

    for rec, t, wm in stream:
        if wm > cur:
            cur = wm
            fire(cur)
        if wm >= t + gap - 1:
            late.append(rec)
            continue
        k = tuple(rec[c] for c in key)
        start, end, vals, rest = t, t + gap, [rec], []
        for s in open_.get(k, []):
            if s[0] < t + gap and s[1] > t:
                start, end, vals = min(start, s[0]), max(end, s[1]), s[2] + vals
            else:
                rest.append(s)
        open_[k] = rest + [[start, end, vals]]
    fire(MAX)
    return sorted(rows), late


def row(keys, k, start, end, **aggs):
    r = dict(zip(keys, k))
    r["window_start"], r["window_end"] = ts_format(start), ts_format(end)
    r.update(aggs)
    return r


def fmt(rec, schema):
    return {c: (ts_format(rec[c]) if schema[c] == "timestamp" and rec[c] is not None else rec[c]) for c in schema}


def write(example, name, rows):
    d = os.path.join(OUT, example) if OUT else os.path.join(HERE, example, "expected")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")


MIN_ = 60_000


def unique_visitors():
    ex, schema = "unique-visitors", {"event_id": "string", "event_time": "timestamp", "page_id": "string", "user_id": "string"}
    recs, dead = read(ex, "clicks.jsonl", schema, "event_time")
    table, late = windows(with_watermarks(recs, 2 * MIN_), ["page_id"], 5 * MIN_, 5 * MIN_, MIN_, lambda v: len({r["user_id"] for r in v}))
    write(ex, "unique-visitors.jsonl", [row(["page_id"], k, s, e, unique_visitors=n) for (k, s, e), n in sorted(table.items())])
    write(ex, "late-clicks.jsonl", [fmt(r, schema) for r in late])
    write(ex, "dead-letter.jsonl", dead)


def failed_logins():
    ex, schema = "failed-logins", {"event_time": "timestamp", "user_id": "string", "success": "bool"}
    recs, dead = read(ex, "logins.jsonl", schema, "event_time")
    failures = [x for x in with_watermarks(recs, 30_000) if x[0]["success"] is False]
    table, late = windows(failures, ["user_id"], 2 * MIN_, 10_000, 0, len)
    alerts = [{"user_id": k[0], "rule": "3-failed-logins-in-2m", "window_end": ts_format(e)} for (k, s, e), n in sorted(table.items()) if n >= 3]
    write(ex, "alerts.jsonl", alerts)
    write(ex, "late-logins.jsonl", [fmt(r, schema) for r in late])
    write(ex, "dead-letter.jsonl", dead)


def user_sessions():
    ex, schema = "user-sessions", {"event_time": "timestamp", "user_id": "string", "page": "string"}
    recs, dead = read(ex, "clicks.jsonl", schema, "event_time")
    rows, late = sessions(with_watermarks(recs, MIN_), ["user_id"], 30 * MIN_, lambda v: (len(v), len({r["page"] for r in v})))
    write(ex, "visits.jsonl", [row(["user_id"], k, s, e, clicks=n, pages=p) for k, s, e, (n, p) in rows])
    write(ex, "late-clicks.jsonl", [fmt(r, schema) for r in late])
    write(ex, "dead-letter.jsonl", dead)


def cdc():
    ex, schema = "cdc-dedup", {"table": "string", "pk": "int", "op": "string", "lsn": "int", "after": "json"}
    recs, dead = read(ex, "changes.jsonl", schema)
    newest, table = {}, {}
    for rec, _ in recs:
        k = (rec["table"], rec["pk"])
        if k in newest and not rec["lsn"] > newest[k]:
            continue
        newest[k] = rec["lsn"]
        if rec["op"] == "delete":
            table.pop(k, None)
        else:
            table[k] = rec
    write(ex, "table.jsonl", [table[k] for k in sorted(table)])
    write(ex, "dead-letter.jsonl", dead)


def revenue(ex, key, size, slide, lateness, ttl, bound, extra):
    schema = {"event_id": "string", "event_time": "timestamp", key: "string", "price": "float", "quantity": "int"}
    recs, dead = read(ex, "sales.jsonl", schema, "event_time")
    unique, dedup_late = dedup_first(with_watermarks(recs, bound), ["event_id"], ttl)
    assert not dedup_late

    def agg(vals):
        # per 'slice' sums in arrival order, then slices in time order, as the window merges them
        by_slice = {}
        for r in vals:
            s = r["event_time"] - r["event_time"] % slide
            by_slice[s] = by_slice.get(s, 0.0) + r["price"] * r["quantity"]
        total = None
        for s in sorted(by_slice):
            total = by_slice[s] if total is None else total + by_slice[s]
        return total, len(vals)

    table, late = windows(unique, [key], size, slide, lateness, agg)
    rows = []
    for (k, s, e), (rev, n) in sorted(table.items()):
        rows.append(row([key], k, s, e, revenue=rev, **({"sales": n} if extra else {})))
    return rows, [fmt(r, schema) for r in late], dead


def revenue_per_store():
    ex = "revenue-per-store"
    rows, late, dead = revenue(ex, "store_id", 10 * MIN_, 10 * MIN_, 5 * MIN_, 60 * MIN_, MIN_, True)
    write(ex, "revenue.jsonl", rows)
    write(ex, "late-sales.jsonl", late)
    write(ex, "dead-letter.jsonl", dead)


def rolling_revenue():
    ex = "rolling-revenue"
    rows, late, dead = revenue(ex, "sku", 60 * MIN_, 5 * MIN_, 10 * MIN_, 180 * MIN_, 5 * MIN_, False)
    write(ex, "rolling-revenue.jsonl", rows)
    write(ex, "late-sales.jsonl", late)
    write(ex, "dead-letter.jsonl", dead)


def orders_paid():
    ex = "orders-paid"
    o_schema = {"order_id": "string", "user_id": "string", "amount": "int", "event_time": "timestamp"}
    p_schema = {"payment_id": "string", "order_id": "string", "amount": "int", "event_time": "timestamp"}
    orders, _ = read(ex, "orders.jsonl", o_schema, "event_time")
    payments, _ = read(ex, "payments.jsonl", p_schema, "event_time")
    orders = with_watermarks(orders, 5 * MIN_)
    payments, _ = dedup_first(with_watermarks(payments, 5 * MIN_), ["payment_id"], 120 * MIN_)
    dead = lambda side, rec, schema, reason: {"origin": "order_paid", "position": f"{side} row", "reason": reason, "record": fmt(rec, schema)}
    late = [dead("orders", r, o_schema, "arrived behind the watermark; too late to join") for r, t, wm in orders if t <= wm]
    late += [dead("unique_payments", r, p_schema, "arrived behind the watermark; too late to join") for r, t, wm in payments if t <= wm]
    lefts = [(r, t) for r, t, wm in orders if t > wm]
    rights = [(r, t) for r, t, wm in payments if t > wm]
    paid, matched, candidate = {}, set(), set()
    for i, (o, to) in enumerate(lefts):
        for j, (p, tp) in enumerate(rights):
            if o["order_id"] == p["order_id"] and to <= tp <= to + 30 * MIN_:
                if o["amount"] == p["amount"]:
                    matched |= {("l", i), ("r", j)}
                    paid[o["order_id"]] = {"order_id": o["order_id"], "user_id": o["user_id"], "amount": o["amount"],
                                           "payment_id": p["payment_id"], "paid_at": ts_format(tp)}
                else:
                    candidate |= {("l", i), ("r", j)}
    unmatched = []
    for side, rows, schema, name in (("l", lefts, o_schema, "orders"), ("r", rights, p_schema, "unique_payments")):
        for i, (r, _) in enumerate(rows):
            if (side, i) not in matched:
                reason = "rows in the interval did not satisfy the join condition" if (side, i) in candidate else "no matching row within the interval"
                unmatched.append(dead(name, r, schema, reason))
    write(ex, "order-paid.jsonl", [paid[k] for k in sorted(paid)])
    write(ex, "unmatched.jsonl", unmatched)
    write(ex, "late.jsonl", late)


if __name__ == "__main__":
    import sys
    if len(sys.argv) == 3 and sys.argv[1] == "--out":
        OUT = sys.argv[2]
    for f in (unique_visitors, failed_logins, user_sessions, cdc, revenue_per_store, rolling_revenue, orders_paid):
        f()
    print("expected outputs written")
