"""Errors of the broker layer; callers map them to HTTP codes or to ack/nack/reject."""


class BrokerError(Exception):
    """Root of every broker-layer error."""


class BrokerUnavailable(BrokerError):
    """RabbitMQ cannot be reached, or the connection broke while publishing."""


class PublishRefused(BrokerError):
    """The broker refused a publish: nacked, or returned as unroutable."""


class BadMessage(BrokerError):
    """A message that does not parse as the schema it claims; it goes to the dead-letter queue."""
