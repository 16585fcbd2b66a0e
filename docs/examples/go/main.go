// Publish one attribute update to imattr with amqp091-go, and wait for the broker's confirm.
//
//	go mod tidy   # fetches github.com/rabbitmq/amqp091-go
//	ACCOUNT=xiaojun012 ATTRS='{"sex":"attr1","city":"attr2"}' go run .
//
// Environment: AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f), IMATTR_EXCHANGE
// (default imattr.updates), ACCOUNT, ATTRS (a JSON object of attribute name to string value, or null to remove the attribute).
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func publish() error {
	url := env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
	exchange := env("IMATTR_EXCHANGE", "imattr.updates")
	account := env("ACCOUNT", "xiaojun012")
	// A nil value is JSON null: it removes the attribute.
	var attrs map[string]*string
	if err := json.Unmarshal([]byte(env("ATTRS", `{"sex":"attr1","city":"attr2"}`)), &attrs); err != nil {
		return fmt.Errorf("ATTRS must be a JSON object of strings or nulls: %w", err)
	}
	body, err := json.Marshal(struct {
		ToAccount string             `json:"To_Account"`
		Attrs     map[string]*string `json:"Attrs"`
	}{account, attrs})
	if err != nil {
		return err
	}

	conn, err := amqp.Dial(url)
	if err != nil {
		return err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	defer ch.Close()
	if err := ch.Confirm(false); err != nil {
		return err
	}
	// A message the exchange routes to no queue comes back on this channel,
	// before its confirm.
	returns := ch.NotifyReturn(make(chan amqp.Return, 1))
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 1))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = ch.PublishWithContext(ctx, exchange, account, true, false, amqp.Publishing{
		ContentType:  "application/json",
		DeliveryMode: amqp.Persistent,
		Body:         body,
	})
	if err != nil {
		return err
	}
	select {
	case c, ok := <-confirms:
		if !ok || !c.Ack {
			return fmt.Errorf("the broker refused (nacked) the message")
		}
	case <-ctx.Done():
		return fmt.Errorf("no confirm from the broker: %w", ctx.Err())
	}
	select {
	case r := <-returns:
		return fmt.Errorf("exchange %s routed the message to no queue: %s", exchange, r.ReplyText)
	default:
	}
	fmt.Printf("published %s\n", body)
	return nil
}

func main() {
	if err := publish(); err != nil {
		fmt.Fprintf(os.Stderr, "not published: %v\n", err)
		os.Exit(1)
	}
}
