// Publish one attribute update to imattr with amqplib, and wait for the broker's confirm.
//
//   npm install amqplib
//   ACCOUNT=xiaojun012 ATTRS='{"sex":"attr1","city":"attr2"}' node publish.js
//
// Environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f), IMATTR_EXCHANGE
// (default imattr.updates), ACCOUNT, ATTRS (a JSON object of attribute name to string value, or null to remove the attribute).
"use strict";

const amqp = require("amqplib");

async function main() {
  const url = process.env.AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/%2f";
  const exchange = process.env.IMATTR_EXCHANGE || "imattr.updates";
  const account = process.env.ACCOUNT || "xiaojun012";
  const attrs = JSON.parse(process.env.ATTRS || '{"sex":"attr1","city":"attr2"}');

  const update = { To_Account: account, Attrs: attrs };
  const body = Buffer.from(JSON.stringify(update), "utf8");

  const conn = await amqp.connect(url);
  try {
    const ch = await conn.createConfirmChannel();
    // A message the exchange routes to no queue comes back as "return".
    let returned = false;
    ch.on("return", () => {
      returned = true;
    });
    ch.publish(exchange, account, body, {
      contentType: "application/json",
      persistent: true,
      mandatory: true,
    });
    await ch.waitForConfirms(); // rejects if the broker nacked the message
    if (returned) {
      throw new Error(`exchange ${exchange} routed the message to no queue`);
    }
    await ch.close();
  } finally {
    await conn.close();
  }
  console.log(`published ${body.toString("utf8")}`);
}

main().catch((err) => {
  console.error(`not published: ${err.message}`);
  process.exit(1);
});
