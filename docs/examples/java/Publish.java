// Publish one attribute update to imattr with the RabbitMQ Java client (5.x), and wait for the
// broker's confirm. Not compiled or run by CI.
//
//   javac -cp amqp-client-5.x.jar Publish.java
//   ACCOUNT=xiaojun012 ATTRS='{"sex":"attr1","city":"attr2"}' \
//     java -cp amqp-client-5.x.jar:slf4j-api.jar:. Publish
//
// Environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f), IMATTR_EXCHANGE
// (default imattr.updates), ACCOUNT, ATTRS (a JSON object of attribute name to string value or null, which removes it,
// passed through as it is: build it with your JSON library).

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.atomic.AtomicBoolean;

public final class Publish {
  private static String env(String name, String fallback) {
    String v = System.getenv(name);
    return v == null || v.isEmpty() ? fallback : v;
  }

  /** A JSON string literal. */
  private static String quote(String s) {
    StringBuilder b = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      if (c == '"' || c == '\\') {
        b.append('\\').append(c);
      } else if (c < 0x20) {
        b.append(String.format("\\u%04x", (int) c));
      } else {
        b.append(c);
      }
    }
    return b.append('"').toString();
  }

  public static void main(String[] args) throws Exception {
    String url = env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    String exchange = env("IMATTR_EXCHANGE", "imattr.updates");
    String account = env("ACCOUNT", "xiaojun012");
    String attrs = env("ATTRS", "{\"sex\":\"attr1\",\"city\":\"attr2\"}");
    byte[] body =
        ("{\"To_Account\":" + quote(account) + ",\"Attrs\":" + attrs + "}")
            .getBytes(StandardCharsets.UTF_8);

    ConnectionFactory factory = new ConnectionFactory();
    factory.setUri(url);
    try (Connection conn = factory.newConnection("imattr publisher example");
        Channel ch = conn.createChannel()) {
      ch.confirmSelect();
      // A message the exchange routes to no queue comes back as a return.
      AtomicBoolean returned = new AtomicBoolean(false);
      ch.addReturnListener(r -> returned.set(true));
      AMQP.BasicProperties props =
          new AMQP.BasicProperties.Builder()
              .contentType("application/json")
              .deliveryMode(2) // persistent
              .build();
      ch.basicPublish(exchange, account, true, props, body);
      // Throws if the broker nacks the message or does not answer in time.
      ch.waitForConfirmsOrDie(10_000);
      if (returned.get()) {
        System.err.println("not published: exchange " + exchange + " routed the message to no queue");
        System.exit(1);
      }
    }
    System.out.println("published " + new String(body, StandardCharsets.UTF_8));
  }
}
