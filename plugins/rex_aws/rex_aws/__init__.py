"""rex-aws: the ``ec2`` worker provider and the ``s3`` blob store.

Importing this package imports neither boto3 nor the components' modules; the plugin
module registers descriptors whose factories import them when called.
"""

__all__: list[str] = []
