# The setting of docs/results.md section 4, sourced by scripts/cifar10_full.sh and scripts/cl_variants.sh so that a
# variant is compared with baseline runs trained under exactly the same recipe: the quickstart networks
# (resnet10t + mobilenetv3_small_050, ImageNet stems, 32 px), batch 128, SGD lr 0.1, one thread per run.
FULL_SETTINGS=(--recipe quickstart --no-progress --set train.batch_size=128 --set train.lr=0.1 --set train.threads=1)
