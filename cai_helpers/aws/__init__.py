"""AWS backend: the launcher for ``backend="aws"``, uploads, and the Lambda bundle builder.

Nothing here imports torch. boto3 is imported where a function needs it, so that the
package imports without it.
"""
