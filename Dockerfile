# One image for every process: the command picks it (serve, worker, ...).
#   docker build -t cytonode .                       # CPU (default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t cytonode:cuda .
FROM python:3.11-slim-bookworm
ARG TORCH_VARIANT=cpu
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      dcmtk dicom3tools libturbojpeg0 nodejs npm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/cytonode
COPY pyproject.toml README.md package.json package-lock.json ./
RUN npm ci --no-audit --no-fund   # OpenSeadragon for the viewer, served from ./node_modules
COPY analysis analysis
COPY dicom_node dicom_node
COPY viewer viewer
COPY conformance conformance
# Editable, so that the viewer finds ./node_modules next to its package.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/${TORCH_VARIANT} \
 && pip install --no-cache-dir -e .
ENV CYTONODE_DATA_DIR=/var/lib/cytonode \
    CYTONODE_BIND_ADDRESS=0.0.0.0
VOLUME /var/lib/cytonode
EXPOSE 11112 8080
USER 1000:1000
ENTRYPOINT ["cytonode"]
CMD ["serve"]
