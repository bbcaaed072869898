# stpp_ray on the official Ray image. GPU nodes (default):
#   docker build -t YOUR_REGISTRY/stpp-ray:2.58.0-gpu .
# CPU-only nodes:
#   docker build -t YOUR_REGISTRY/stpp-ray:2.58.0-cpu --build-arg RAY_IMAGE=rayproject/ray:2.58.0-py311-cpu .
# The Ray version of the base image must equal the ray pin in pyproject.toml (a test checks).
ARG RAY_IMAGE=rayproject/ray:2.58.0-py311-gpu
FROM ${RAY_IMAGE}

WORKDIR /home/ray/stpp_ray

# Dependencies first (cached while only the code changes); versions as pinned in pyproject.toml,
# and mlflow-skinny (the tracking extra) at the version tested.
RUN pip install --no-cache-dir "torch==2.14.1" "torchvision==0.29.1" "ray[default,train,data,tune]==2.58.0" \
        "mlflow-skinny==3.17.2"

COPY --chown=ray:users pyproject.toml README.md LICENSE ./
COPY --chown=ray:users stpp_ray ./stpp_ray
COPY --chown=ray:users jobs ./jobs
RUN pip install --no-cache-dir .

CMD ["stpp-ray", "--help"]
