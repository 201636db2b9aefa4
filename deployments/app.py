"""`build_app(AppConfig)`: the Serve application (Router → DecodeServer → PrefillServer over
HTTP, with the Registry for discovery). Serve config: `import_path: deployments.app:build_app`."""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from disagg.config import AppConfig, RoleConfig
from deployments.registry import Registry
from deployments.router import Router
from deployments.workers import DecodeServer, PrefillServer


def _replica_options(role: RoleConfig) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": role.ray_num_cpus}
    if role.ray_num_gpus:
        actor["num_gpus"] = role.ray_num_gpus
    if role.ray_resources:
        # Custom resources place each role on its own worker group (KubeRay).
        actor["resources"] = dict(role.ray_resources)
    return {"num_replicas": role.replicas, "ray_actor_options": actor}


def build_app(args: AppConfig | dict[str, Any]) -> Application:
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    if config.decode.replicas < 1:
        raise ValueError("at least one decode replica is needed")
    registry = Registry.bind()
    # No prefill replicas: an aggregated stack, where every decode prefills its own prompts.
    prefill = (PrefillServer.options(**_replica_options(config.prefill)).bind(config, registry)
               if config.prefill.replicas else None)
    decode = DecodeServer.options(
        **_replica_options(config.decode),
        request_router_config=RequestRouterConfig(
            request_router_class="deployments.pin_router.PinnedReplicaRouter"),
    ).bind(config, registry)
    return Router.bind(config, decode, prefill, registry)
