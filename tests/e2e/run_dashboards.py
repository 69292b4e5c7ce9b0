"""Runs every Grafana panel and template-variable query of fleetlake's dashboards
through psycopg against fleetlake's Postgres endpoint, after expanding Grafana's
macros and variables as Grafana's PostgreSQL data source does (grafana_sql.py).

Env: FLEETLAKE_PG_PORT; argv: dashboard JSON files. Prints JSON: one entry per query
with its columns, their type OIDs, the row count and whether the result has what the
panel needs (time-series: `time` first, then text `metric` if long format, numbers).
"""

import json
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).parent))
import grafana_sql  # noqa: E402

NUMERIC = {20, 21, 23, 700, 701, 1700}
TEXT = {25, 1043, 19}
TIME = {1184, 1114} | NUMERIC

now = datetime.now(timezone.utc).replace(microsecond=0)
time_from, time_to = now - timedelta(hours=1), now + timedelta(minutes=5)
conn = psycopg.connect(
    host="127.0.0.1", port=int(os.environ["FLEETLAKE_PG_PORT"]), user="grafana",
    dbname="fleetlake", autocommit=True,
)


def run(sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        rows = cur.fetchall()
        return [(d.name, d.type_code) for d in cur.description], rows


results = []
for path in sys.argv[1:]:
    variables = {}
    # Template variables in order, each from its query, as Grafana fills them.
    for name, sql, var in grafana_sql.variable_queries(path):
        expanded = grafana_sql.expand(sql, time_from, time_to, timedelta(minutes=1), variables)
        columns, rows = run(expanded)
        values = [str(r[0]) for r in rows]
        results.append({"dashboard": Path(path).name, "panel": f"${name}", "type": "variable",
                        "format": "table", "columns": columns, "rows": len(rows), "ok": bool(values)})
        allv = grafana_sql.all_value(path, name) if var.get("includeAll") else None
        if var.get("multi") or var.get("includeAll"):
            variables[name] = allv if allv is not None else values
        else:
            variables[name] = values[0] if values else ""
    # Annotation queries: Grafana reads `time` (and `timeend`), `text` and `tags`.
    dash = json.loads(Path(path).read_text())
    for anno in (dash.get("annotations") or {}).get("list") or []:
        target = anno.get("target") or {}
        if not target.get("rawSql"):
            continue
        expanded = grafana_sql.expand(target["rawSql"], time_from, time_to, timedelta(minutes=1), variables)
        try:
            columns, rows = run(expanded)
        except psycopg.Error as e:
            results.append({"dashboard": Path(path).name, "panel": f"annotation {anno.get('name')}",
                            "type": "annotation", "error": f"{e.sqlstate}: {e}", "sql": expanded, "ok": False})
            continue
        names = [c[0] for c in columns]
        ok = (len(rows) > 0 and names[0] == "time" and columns[0][1] in TIME and "text" in names
              and all(isinstance(r[names.index("text")], str) for r in rows))
        results.append({"dashboard": Path(path).name, "panel": f"annotation {anno.get('name')}",
                        "type": "annotation", "format": "table", "columns": columns, "rows": len(rows),
                        "ok": ok, **({} if ok else {"sql": expanded})})
    for dashboard, panel, ptype, target in grafana_sql.dashboard_targets(path):
        fmt = target.get("format", "time_series")
        for interval in (timedelta(minutes=1), timedelta(minutes=5)):
            expanded = grafana_sql.expand(target["rawSql"], time_from, time_to, interval, variables)
            try:
                columns, rows = run(expanded)
            except psycopg.Error as e:
                results.append({"dashboard": Path(path).name, "panel": panel, "type": ptype,
                                "format": fmt, "error": f"{e.sqlstate}: {e}", "sql": expanded, "ok": False})
                continue
            oids = [c[1] for c in columns]
            ok = len(rows) > 0
            if fmt == "time_series":
                ok = ok and columns[0][0] == "time" and oids[0] in TIME
                rest = oids[1:]
                if rest and rest[0] in TEXT:  # long format: metric, then values
                    ok = ok and columns[1][0] == "metric" and all(o in NUMERIC for o in rest[1:]) and len(rest) > 1
                else:
                    ok = ok and len(rest) > 0 and all(o in NUMERIC for o in rest)
                times = [r[0] for r in rows]
                ok = ok and times == sorted(times)
            results.append({"dashboard": Path(path).name, "panel": panel, "type": ptype,
                            "format": fmt, "interval": str(interval), "columns": columns,
                            "rows": len(rows), "ok": ok, **({} if ok else {"sql": expanded})})
print(json.dumps(results))
