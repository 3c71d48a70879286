"""The volunteer GPU worker: AMQP consumption, model loading, generation and safety checking."""
