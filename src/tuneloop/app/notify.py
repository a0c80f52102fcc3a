"""Notifications: a webhook (Slack, Teams, anything that takes a POST) told when a retrain fails and when a
model is promoted, through a Prefect notification block and two automations on the server.

Automations live on the Prefect server, not in prefect.yaml (which can only declare triggers that start
deployments), so ``tuneloop notify --webhook URL`` creates them; deployments/automations.yaml is the
same thing for ``prefect automation create``.

The webhook URL is the secret (Slack, Teams and most others put the token in it): the block keeps it in its
``secrets`` (a SecretDict, encrypted by the server and shown as ******** in the UI and in the
``prefect.block-document.*`` events) and its ``url`` is only the template ``{{webhook_url}}``, filled in when
the server posts. Nothing in Prefect's database holds the URL in plain text.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from tuneloop.lib.registry import PROMOTED_EVENT

BLOCK_NAME = "tuneloop-notify"
URL_SECRET = "webhook_url"  # the key of the webhook URL in the block's secrets


def automations(model_name: str, block_document_id) -> list:
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    failed = Automation(
        name="tuneloop: retrain failed",
        description="A retrain flow run failed or crashed.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": "retrain"},
            posture=Posture.Reactive, threshold=1),
        actions=[SendNotification(
            block_document_id=block_document_id,
            subject="tuneloop: retrain {{ flow_run.name }} {{ flow_run.state.name }}",
            body="Flow run {{ flow_run.name }} ended {{ flow_run.state.name }}: {{ flow_run.state.message }}")])
    promoted = Automation(
        name="tuneloop: model promoted",
        description="A new champion was promoted in the MLflow registry.",
        trigger=EventTrigger(expect={PROMOTED_EVENT}, match={"prefect.resource.id": f"tuneloop.model.{model_name}"},
                             posture=Posture.Reactive, threshold=1),
        actions=[SendNotification(
            block_document_id=block_document_id,
            subject="tuneloop: {{ event.resource.name }} v{{ event.payload.version }} is the new champion",
            body="{{ event.payload.summary }}")])
    return [failed, promoted]


def setup_notifications(model_name: str, webhook_url: str) -> list[str]:
    """Create (or replace) the webhook block and the two automations; returns the automations' names."""
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from tuneloop.core.scrub import install_log_scrubber, register

    install_log_scrubber()
    register(webhook_url)  # out of this process's log lines too
    block = CustomWebhookNotificationBlock(
        name=f"tuneloop -> {urlsplit(webhook_url).hostname or 'webhook'}",  # where it posts, without the token
        url="{{" + URL_SECRET + "}}", secrets={URL_SECRET: webhook_url}, method="POST",
        json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"},
        allow_private_urls=True)  # company webhooks often live on private addresses
    block_id = block.save(BLOCK_NAME, overwrite=True)
    names = []
    for automation in automations(model_name, block_id):
        try:
            Automation.read(name=automation.name).delete()
        except ValueError:
            pass
        automation.create()
        names.append(automation.name)
    return names

