"""cdk-nag's AwsSolutions findings for one scope, as readable lines (empty: clean)."""

from __future__ import annotations


def nag_findings(app, scope) -> list[str]:
    """`rule at resource, ...` for every unacknowledged AwsSolutions violation under `scope`."""
    from cdk_nag import AwsSolutionsChecks

    report = AwsSolutionsChecks(app).validate_scope(scope)
    findings = [
        f"{violation.rule_name} at "
        + ", ".join(r.construct_path or r.resource_logical_id or "?" for r in violation.violating_resources)
        for violation in report.violations
    ]
    if not report.success and not findings:
        findings.append("cdk-nag reported failure without violations")
    return findings
