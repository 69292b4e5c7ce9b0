#!/usr/bin/env python3
"""Smithy RPC v2 CBOR -> AWS JSON 1.0 shim in front of moto (CloudWatch only).

usage: cloudwatch_shim.py LISTEN_PORT UPSTREAM_URL   (binds 127.0.0.1; prints "ready PORT")

Requests to /service/GraniteServiceVersion20100801/operation/<Op> are decoded
(CBOR, gzip if Content-Encoding says so), re-sent to moto as JSON 1.0 with
X-Amz-Target GraniteServiceVersion20100801.<Op>, and moto's JSON answer is
re-encoded as CBOR following the botocore output shape (timestamps as tag 1,
doubles as floats, nulls in lists dropped). Anything else (STS, ...) is
forwarded verbatim.
"""
import datetime
import gzip
import json
import threading
import time
import uuid
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import botocore.session
import cbor2

PREFIX = "/service/GraniteServiceVersion20100801/operation/"
TARGET = "GraniteServiceVersion20100801."
MODEL = botocore.session.get_session().get_service_model("cloudwatch")
UPSTREAM = sys.argv[2].rstrip("/")
BASIC_STATS = {"Sum", "SampleCount", "Minimum", "Maximum", "Average"}
COPY = ("authorization", "x-amz-date", "x-amz-security-token", "x-moto-account-id", "user-agent")


def to_json(v):
    if isinstance(v, datetime.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=datetime.timezone.utc)
        return v.timestamp()
    if isinstance(v, cbor2.CBORTag) and v.tag == 1:
        return float(v.value)
    if isinstance(v, dict):
        return {k: to_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [to_json(x) for x in v]
    return v


def to_cbor(v, shape):
    """moto's JSON value -> the Python value cbor2 must encode for `shape`."""
    t = shape.type_name
    if v is None:
        return None
    if t == "structure":
        out = {}
        for name, member in shape.members.items():
            if name in v and v[name] is not None:
                out[name] = to_cbor(v[name], member)
        return out
    if t == "list":
        return [to_cbor(x, shape.member) for x in v if x is not None]
    if t == "map":
        return {k: to_cbor(x, shape.value) for k, x in v.items() if x is not None}
    if t == "timestamp":
        if isinstance(v, str):
            v = datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        return cbor2.CBORTag(1, float(v))
    if t in ("double", "float"):
        return float(v)
    if t in ("integer", "long"):
        return int(v)
    return v


def zip_values(result):
    """A datapoint moto could not compute (a percentile: null) has no value: drop
    its timestamp too, keeping Timestamps[i] <-> Values[i]."""
    for r in result.get("MetricDataResults") or []:
        ts, vs = r.get("Timestamps") or [], r.get("Values") or []
        pairs = [(t, v) for t, v in zip(ts, vs) if v is not None]
        r["Timestamps"] = [t for t, _ in pairs]
        r["Values"] = [v for _, v in pairs]
    return result


# Test controls: POST /_shim/throttle N (the next N CBOR calls are throttled),
# POST /_shim/page N (GetMetricData answers at most N datapoints per result and page,
# with a NextToken for the rest, as CloudWatch does past its limits), POST
# /_shim/fail_after N (after N more CBOR calls every call is throttled; -1: off),
# POST /_shim/delay_ms N (each CBOR call is answered N ms late), POST
# /_shim/synthetic N (for load runs, without moto: every account has N metrics
# Synth/M<i> {Id=<i>} with a datapoint in every period), GET /_shim/stats (calls by
# access key and operation).
STATE = {"throttle": 0, "fail_after": -1, "delay_ms": 0, "synthetic": 0, "page": 0, "pages": {}, "calls": {}}
LOCK = threading.Lock()


def access_key(headers):
    auth = headers.get("authorization") or ""
    return auth.split("Credential=")[1].split("/")[0] if "Credential=" in auth else ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _body(self):
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status, headers, body):
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _upstream(self, method, path, headers, body):
        req = urllib.request.Request(UPSTREAM + path, data=body if method != "GET" else None,
                                     method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, list(r.headers.items()), r.read()
        except urllib.error.HTTPError as e:
            return e.code, list(e.headers.items()), e.read()

    def do_GET(self):
        if self.path == "/_shim/stats":
            with LOCK:
                body = json.dumps(STATE["calls"]).encode()
            return self._send(200, [("content-type", "application/json")], body)
        self._passthrough("GET")

    def do_POST(self):
        if self.path in ("/_shim/throttle", "/_shim/page", "/_shim/fail_after", "/_shim/delay_ms",
                         "/_shim/synthetic"):
            with LOCK:
                STATE[self.path[len("/_shim/"):]] = int(self._body() or b"0")
            return self._send(200, [], b"")
        if not self.path.startswith(PREFIX):
            return self._passthrough("POST")
        op = self.path[len(PREFIX):].split("?")[0]
        raw = self._body()
        cbor_headers = [("content-type", "application/cbor"), ("smithy-protocol", "rpc-v2-cbor")]
        with LOCK:
            per_key = STATE["calls"].setdefault(access_key(self.headers), {})
            per_key[op] = per_key.get(op, 0) + 1
            delay = STATE["delay_ms"] / 1000.0
            throttled = STATE["throttle"] > 0 or STATE["fail_after"] == 0
            STATE["throttle"] -= STATE["throttle"] > 0
            STATE["fail_after"] -= STATE["fail_after"] > 0
        if delay:
            time.sleep(delay)
        if throttled:  # what CloudWatch answers over its quota (moto never does)
            return self._send(400, cbor_headers + [("x-amzn-query-error", "Throttling;Sender")],
                              cbor2.dumps({"__type": "Throttling", "message": "Rate exceeded"}))
        if self.headers.get("content-encoding", "").lower() == "gzip":
            raw = gzip.decompress(raw)
        params = to_json(cbor2.loads(raw)) if raw else {}
        if STATE["synthetic"] > 0:
            return self._synthetic(op, params, cbor_headers)
        # moto computes only Sum/SampleCount/Minimum/Maximum/Average; any other stat
        # (p99, TM(..), ...) makes it fail the whole call (500). Keep those queries
        # here and answer them with no datapoints.
        unsupported = []
        if op == "GetMetricData":
            queries = params.get("MetricDataQueries") or []
            if len(queries) > 500:  # CloudWatch's limit, which moto does not enforce
                return self._send(400, cbor_headers + [("x-amzn-query-error", "InvalidParameterValue;Sender")],
                                  cbor2.dumps({"__type": "InvalidParameterValue",
                                               "message": "The collection MetricDataQueries must not have a size greater than 500."}))
            unsupported = [q for q in queries if "MetricStat" in q
                           and q["MetricStat"].get("Stat") not in BASIC_STATS]
            params["MetricDataQueries"] = [q for q in queries if q not in unsupported]
        headers = {k: self.headers[k] for k in COPY if self.headers.get(k)}
        headers["content-type"] = "application/x-amz-json-1.0"
        headers["x-amz-target"] = TARGET + op
        token = params.pop("NextToken", None) if op == "GetMetricData" else None
        if token is not None:
            with LOCK:
                rest = STATE["pages"].pop(token, None)
            if rest is None:
                return self._send(400, cbor_headers + [("x-amzn-query-error", "InvalidNextToken;Sender")],
                                  cbor2.dumps({"__type": "InvalidNextToken", "message": "bad token"}))
            status, up_headers, body, unsupported = 200, [], json.dumps(rest).encode(), []
        elif op == "GetMetricData" and not params["MetricDataQueries"]:
            status, up_headers, body = 200, [], b"{}"
        else:
            status, up_headers, body = self._upstream("POST", "/", headers, json.dumps(params).encode())
        out_headers = list(cbor_headers)
        out_headers += [(k, v) for k, v in up_headers
                        if k.lower() in ("x-amzn-requestid", "x-amz-request-id", "x-amzn-query-error")]
        try:
            doc = json.loads(body) if body.strip() else {}
        except ValueError:
            doc = {"__type": "InternalFailure", "message": body[:200].decode(errors="replace")}
        if status >= 300:
            code = (doc.get("__type") or "InternalFailure")
            err = {"__type": code, "message": doc.get("message") or doc.get("Message") or ""}
            return self._send(status, out_headers, cbor2.dumps(err))
        if unsupported:
            doc.setdefault("MetricDataResults", []).extend(
                {"Id": q["Id"], "Label": q.get("Label") or q["Id"], "Timestamps": [], "Values": [],
                 "StatusCode": "Complete"} for q in unsupported)
        if op == "GetMetricData" and STATE["page"] > 0:
            doc = self._page(doc, STATE["page"])
        shape = MODEL.operation_model(op).output_shape
        result = to_cbor(zip_values(doc), shape) if shape is not None else {}
        self._send(200, out_headers, cbor2.dumps(result))

    def _synthetic(self, op, params, headers):
        n = STATE["synthetic"]
        if op == "ListMetrics":
            start = int(params.get("NextToken") or 0)
            page = {"Metrics": [{"Namespace": "Synth", "MetricName": f"M{i}",
                                 "Dimensions": [{"Name": "Id", "Value": str(i)}]}
                                for i in range(start, min(n, start + 500))]}
            if start + 500 < n:
                page["NextToken"] = str(start + 500)
            return self._send(200, headers, cbor2.dumps(page))
        if op != "GetMetricData":
            return self._send(400, headers, cbor2.dumps({"__type": "InvalidAction", "message": op}))
        start, end = int(params["StartTime"]), int(params["EndTime"])
        results = []
        for q in params["MetricDataQueries"]:
            stat = q["MetricStat"]
            period = int(stat["Period"])
            metric = int(stat["Metric"]["Dimensions"][0]["Value"])
            scale = {"Sum": 10.0, "SampleCount": 2.0, "Minimum": 1.0, "Maximum": 9.0}.get(stat["Stat"], 5.0)
            times = range(start - start % period, end, period)
            results.append({"Id": q["Id"], "StatusCode": "Complete",
                            "Timestamps": [cbor2.CBORTag(1, float(t)) for t in times],
                            "Values": [scale + (metric + t // period) % 7 for t in times]})
        return self._send(200, headers, cbor2.dumps({"MetricDataResults": results}))

    def _page(self, doc, n):
        """The first n datapoints of each result; the rest kept under a NextToken."""
        doc = zip_values(doc)
        first, rest = [], []
        for r in doc.get("MetricDataResults") or []:
            head = dict(r, Timestamps=r["Timestamps"][:n], Values=r["Values"][:n])
            if len(r["Timestamps"]) > n:
                head["StatusCode"] = "PartialData"
                rest.append(dict(r, Timestamps=r["Timestamps"][n:], Values=r["Values"][n:]))
            first.append(head)
        doc["MetricDataResults"] = first
        if rest:
            token = uuid.uuid4().hex
            with LOCK:
                STATE["pages"][token] = {"MetricDataResults": rest}
            doc["NextToken"] = token
        return doc

    def _passthrough(self, method):
        body = self._body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        status, up_headers, out = self._upstream(method, self.path, headers, body)
        self._send(status, up_headers, out)


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print(f"ready {server.server_address[1]}", flush=True)
    server.serve_forever()
