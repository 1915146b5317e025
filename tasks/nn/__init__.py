"""Models, SyncBatchNorm and BatchNorm-statistics helpers."""

from tasks.nn.syncbn import BatchNormNd, SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

__all__ = ["BatchNormNd", "SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]
