"""Publish one attribute update to imattr with pika, and wait for the broker's confirm.

    pip install pika
    ACCOUNT=xiaojun012 ATTRS='{"sex":"attr1","city":"attr2"}' python3 publish.py

Environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f), IMATTR_EXCHANGE
(default imattr.updates), ACCOUNT, ATTRS (a JSON object of attribute name to string value, or null to remove the attribute).
"""

import json
import os
import sys

import pika


def main() -> int:
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    exchange = os.environ.get("IMATTR_EXCHANGE", "imattr.updates")
    account = os.environ.get("ACCOUNT", "xiaojun012")
    attrs = json.loads(os.environ.get("ATTRS", '{"sex":"attr1","city":"attr2"}'))

    update = {"To_Account": account, "Attrs": attrs}
    body = json.dumps(update, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        # With confirms on, basic_publish returns once the broker has taken the
        # message, and raises if it was refused (nacked) or routed nowhere (mandatory).
        ch.confirm_delivery()
        ch.basic_publish(
            exchange=exchange,
            routing_key=account,
            body=body,
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
            ),
            mandatory=True,
        )
    except pika.exceptions.UnroutableError:
        print(f"not published: exchange {exchange} routed the message to no queue", file=sys.stderr)
        return 1
    except pika.exceptions.NackError:
        print("not published: the broker refused (nacked) the message", file=sys.stderr)
        return 1
    finally:
        conn.close()
    print(f"published {body.decode('utf-8')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
