"""The local stack: Postgres, a Kafka-protocol broker, an S3 server and the services, no Docker."""

from cohortflow.stack.launcher import LocalStack, ProcessInfo, ServiceInfo, StackError, StackInfo

__all__ = ["LocalStack", "ProcessInfo", "ServiceInfo", "StackError", "StackInfo"]
