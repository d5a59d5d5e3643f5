"""The `Network` stack: the VPC (with flow logs), the ECS cluster and the Cloud Map namespace.

Only made when the settings create at least one of them (`EnvironmentSettings.creates_network`);
see stacks/network.py.
"""

from __future__ import annotations

from typing import Any

from aws_cdk import Stack
from constructs import Construct

from stacks.network import Network
from stacks.settings import EnvironmentSettings


class NetworkStack(Stack):
    """Attributes: `network` (vpc, cluster, namespace, flow_log_key)."""

    def __init__(
        self, scope: Construct, construct_id: str, *, settings: EnvironmentSettings, **kwargs: Any
    ) -> None:
        if not settings.creates_network:
            raise ValueError(
                f"{settings.stage_name}: vpc, cluster and namespace are all imported; "
                "a Network stack would have no resources (the Services stack imports them)"
            )
        super().__init__(
            scope,
            construct_id,
            description=f"hokusai-mtls {settings.environment}: VPC, ECS cluster and Cloud Map namespace",
            **kwargs,
        )
        self.network = Network(self, "Network", settings=settings)
