"""Prometheus config and rules: promtool's checks and unit tests, and their coverage."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.deploy.helpers import DEPLOY, RULES, base_metric, contract_metrics, series_names, tool

RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yml"))


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=DEPLOY.parent)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_promtool_check_rules_and_config():
    out = _run(tool("promtool"), "check", "rules", str(RULES))
    assert f"SUCCESS: {len(_rules())} rules found" in out
    # the config loads the same rule files (relative path), so this checks them in place too
    out = _run(tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert "1 rule files found" in out


def test_promtool_unit_tests_pass():
    assert RULE_TESTS
    out = _run(tool("promtool"), "test", "rules", *map(str, RULE_TESTS))
    assert out.count("SUCCESS") == len(RULE_TESTS)


def test_every_rule_has_a_unit_test():
    """Each recorded series is asserted on, and each alert is seen firing, in some test."""
    tested_exprs, fired = [], set()
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            tested_exprs += [t["expr"] for t in group.get("promql_expr_test", [])]
            fired |= {t["alertname"] for t in group.get("alert_rule_test", []) if t["exp_alerts"]}
    tested = set().union(*map(series_names, tested_exprs))
    for rule in _rules():
        if "record" in rule:
            assert rule["record"] in tested, f"recording rule {rule['record']} has no test"
        else:
            assert rule["alert"] in fired, f"alert {rule['alert']} is never tested firing"


def test_rules_read_only_contract_metrics_and_labels():
    contract = contract_metrics()
    recorded = {r["record"] for r in _rules() if "record" in r}
    for rule in _rules():
        for name in series_names(rule["expr"]):
            if name.startswith("sdde:"):
                assert name in recorded, f"{name} is not recorded here"
            else:
                assert base_metric(name) in contract, f"{name} is not in docs/architecture.md"
        # labels used in matchers and grouping exist on the metric (or are Prometheus' own)
        for name, matchers in re.findall(r"(sdde_\w+)\{([^}]*)\}", rule["expr"]):
            for label in re.findall(r"(\w+)\s*[!=]~?", matchers):
                assert label in contract[base_metric(name)] | {"le", "job", "instance"}, label


def test_alerts_have_severity_runbook_and_readme_section():
    readme = (DEPLOY / "README.md").read_text().lower()
    for rule in _rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"warning", "critical"}
            anchor = rule["annotations"]["runbook"].split("#")[1]
            assert anchor == rule["alert"].lower()
            assert f"### {rule['alert'].lower()}" in readme, f"README has no {rule['alert']}"
