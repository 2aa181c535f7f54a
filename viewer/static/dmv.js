// A slide and CytoNode's results in dicom-microscopy-viewer (the engine of Slim and OHIF's
// microscopy mode), over any DICOMweb server. Configuration: the viewport's data attributes
// (dicomweb, study, series), overridden by the query parameters of the same names; without a
// series, the study's first slide (modality SM). Loads the slide's VOLUME/THUMBNAIL images, then
// every Microscopy Bulk Simple Annotations, Segmentation and Comprehensive 3D SR in the study that
// lies in the slide's frame of reference. window.cytonodeDmv reports progress (the browser test).
(function () {
  "use strict";
  const DMV = window.dicomMicroscopyViewer;
  const DWC = window.DICOMwebClient;
  const SOP = {
    slide: "1.2.840.10008.5.1.4.1.1.77.1.6",
    ann: "1.2.840.10008.5.1.4.1.1.91.1",
    seg: "1.2.840.10008.5.1.4.1.1.66.4",
    sr: "1.2.840.10008.5.1.4.1.1.88.34",
  };
  const MEASUREMENT_GROUP = "125007"; // DCM, TID 1410/1411 Measurement Group
  const state = window.cytonodeDmv = {
    ready: false, error: null, errors: [], slide: null,
    tilesLoaded: 0, tilesFailed: 0, segmentTilesLoaded: 0, segmentTilesFailed: 0,
    annotationGroups: [], annotationsLoaded: {}, segments: [], rois: [],
  };
  const el = document.getElementById("dmv-viewport");
  const statusEl = document.getElementById("dmv-status");
  const params = new URLSearchParams(window.location.search);
  const config = {};
  for (const name of ["dicomweb", "study", "series"]) {
    config[name] = params.get(name) || el.dataset[name] || "";
  }

  const status = (text) => { statusEl.textContent = text; };
  const fail = (error) => {
    state.error = String((error && error.message) || error);
    state.errors.push(state.error);
    if (error && error.stack) console.error(error.stack);
    status("error: " + state.error);
  };
  const first = (seq) => (Array.isArray(seq) ? seq[0] : seq);
  const value = (item, tag) => {
    const element = item[tag];
    return element && element.Value ? element.Value[0] : undefined;
  };

  /** Slide coordinates (mm) and image coordinates (base level pixels) to CSS pixels of the viewport. */
  function api(viewer) {
    const map = viewer.getMap();
    const toScreen = (coordinate) => {
      const pixel = map.getPixelFromCoordinate(coordinate);
      return pixel ? [pixel[0], pixel[1]] : null;
    };
    return {
      // The library's own convention: image column x, row y -> map coordinate (x, -(y + 1)).
      imageToScreen: (x, y) => toScreen([x, -(y + 1)]),
      slideToScreen: (x, y) => {
        const p = DMV.utils.applyInverseTransform({ coordinate: [x, y], affine: viewer.getAffine() });
        return toScreen([p[0], -(p[1] + 1)]);
      },
      // Fit the whole slide into the viewport (the test compares screenshots at this view).
      fit: () => map.getView().fit(map.getView().getProjection().getExtent(), { size: map.getSize() }),
      // Resolves when OpenLayers finished a frame with every tile in, or after 10 s at most.
      render: () => new Promise((resolve) => {
        const timer = setTimeout(() => resolve(false), 10000);
        map.once("rendercomplete", () => { clearTimeout(timer); resolve(true); });
        map.render();
      }),
      showAnnotations: (visible) => state.annotationGroups.forEach((g) => {
        if (visible) viewer.showAnnotationGroup(g.uid, { color: g.color, opacity: 1 });
        else viewer.hideAnnotationGroup(g.uid);
      }),
      // visible: true (all), false (none) or the number of the one segment to show.
      showSegments: (visible, opacity = 0.75) => state.segments.forEach((s) => {
        if (visible === true || visible === s.number) viewer.showSegment(s.uid, { opacity });
        else viewer.hideSegment(s.uid);
      }),
      showROIs: (visible) => (visible ? viewer.showROIs() : viewer.hideROIs()),
    };
  }

  function listItem(listId, text, color) {
    const li = document.createElement("li");
    if (color) {
      const swatch = document.createElement("span");
      swatch.className = "dmv-swatch";
      swatch.style.background = `rgb(${color.join(",")})`;
      li.appendChild(swatch);
    }
    li.appendChild(document.createTextNode(text));
    document.getElementById(listId).appendChild(li);
  }

  /** Every instance's metadata of every series in the study, by SOP Class UID. */
  async function studyMetadata(client) {
    const series = await client.searchForSeries({ studyInstanceUID: config.study });
    const out = { slide: {}, ann: [], seg: [], sr: [] };
    for (const s of series) {
      const uid = value(s, "0020000E");
      const metadata = await client.retrieveSeriesMetadata({
        studyInstanceUID: config.study, seriesInstanceUID: uid });
      for (const m of metadata) {
        const sopClass = value(m, "00080016");
        if (sopClass === SOP.slide) (out.slide[uid] = out.slide[uid] || []).push(m);
        else if (sopClass === SOP.ann) out.ann.push(m);
        else if (sopClass === SOP.seg) out.seg.push(m);
        else if (sopClass === SOP.sr) out.sr.push(m);
      }
    }
    return out;
  }

  // Some DICOMweb servers (Orthanc's DICOMweb plugin 1.7) write the OD/OF/OL values of the
  // annotation groups into the JSON metadata as one number, and their bulk data resource is cut
  // short too. Then the group's Point Coordinates Data, Double Point Coordinates Data and Long
  // Primitive Point Index List are read from the instance itself (WADO-RS, Part 10, explicit VR
  // little endian) and put back into the metadata as InlineBinary, which the library decodes.
  const BINARY = { "00660016": "OF", "00660022": "OD", "00660040": "OL" };
  const LONG_VRS = new Set(["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UR", "UT", "UN", "SV", "UV"]);
  const UNDEFINED = 0xffffffff;

  function readDataset(view, start, end, items) {
    // Explicit VR little endian elements from start to end (or to an item delimiter); returns
    // [elements, next offset]; elements: tag -> {vr, offset, length} or {vr: "SQ", items: [...]}.
    const out = {};
    let pos = start;
    while (pos + 8 <= end) {
      const group = view.getUint16(pos, true), element = view.getUint16(pos + 2, true);
      const tag = (group.toString(16).padStart(4, "0") + element.toString(16).padStart(4, "0")).toUpperCase();
      if (group === 0xfffe) {  // item delimiter ends this item
        pos += 8;
        if (element === 0xe00d) return [out, pos];
        continue;
      }
      const vr = String.fromCharCode(view.getUint8(pos + 4), view.getUint8(pos + 5));
      let length, header;
      if (LONG_VRS.has(vr)) { length = view.getUint32(pos + 8, true); header = 12; }
      else { length = view.getUint16(pos + 6, true); header = 8; }
      pos += header;
      if (vr === "SQ") {
        const seqEnd = length === UNDEFINED ? end : pos + length;
        const list = [];
        while (pos + 8 <= seqEnd) {
          const g = view.getUint16(pos, true), e = view.getUint16(pos + 2, true);
          const itemLength = view.getUint32(pos + 4, true);
          pos += 8;
          if (g === 0xfffe && e === 0xe0dd) break;  // sequence delimiter
          const itemEnd = itemLength === UNDEFINED ? seqEnd : pos + itemLength;
          const [item, next] = readDataset(view, pos, itemEnd, true);
          list.push(item);
          pos = itemLength === UNDEFINED ? next : itemEnd;
        }
        out[tag] = { vr, items: list };
      } else {
        if (length === UNDEFINED) throw new Error(`undefined length ${vr} element ${tag}`);
        out[tag] = { vr, offset: pos, length };
        pos += length;
      }
    }
    return [out, pos];
  }

  function toBase64(bytes) {
    let binary = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(binary);
  }

  function truncated(m) {
    const groups = (m["006A0002"] && m["006A0002"].Value) || [];
    return groups.some((g) => Object.keys(BINARY).some((tag) => g[tag] && "Value" in g[tag]));
  }

  async function repairAnnotationMetadata(client, m) {
    const p10 = await client.retrieveInstance({ studyInstanceUID: value(m, "0020000D"),
      seriesInstanceUID: value(m, "0020000E"), sopInstanceUID: value(m, "00080018") });
    const buffer = p10 instanceof ArrayBuffer ? p10 : p10.buffer;
    const view = new DataView(buffer);
    if (String.fromCharCode(...new Uint8Array(buffer, 128, 4)) !== "DICM") throw new Error("not Part 10");
    const metaLength = view.getUint32(132 + 8, true);  // (0002,0000) UL group length
    const [meta] = readDataset(view, 132, 132 + 12 + metaLength, false);
    const ts = meta["00020010"];
    const syntax = new TextDecoder().decode(new Uint8Array(buffer, ts.offset, ts.length)).replace(/[\0 ]+$/, "");
    if (syntax !== "1.2.840.10008.1.2.1") throw new Error(`transfer syntax ${syntax} is not explicit VR LE`);
    const [dataset] = readDataset(view, 132 + 12 + metaLength, buffer.byteLength, false);
    const stored = (dataset["006A0002"] || { items: [] }).items;
    m["006A0002"].Value.forEach((group, i) => {
      for (const [tag, vr] of Object.entries(BINARY)) {
        const element = stored[i] && stored[i][tag];
        if (!group[tag] || !element) continue;
        group[tag] = { vr, InlineBinary: toBase64(new Uint8Array(buffer, element.offset, element.length)) };
      }
    });
    state.repairedAnnotations = (state.repairedAnnotations || 0) + 1;
  }

  async function addAnnotations(viewer, client, metadata, frameOfReference) {
    for (const m of metadata) {
      if (truncated(m)) await repairAnnotationMetadata(client, m);
      const ann = new DMV.metadata.MicroscopyBulkSimpleAnnotations({ metadata: m });
      if (ann.FrameOfReferenceUID !== frameOfReference) continue;
      viewer.addAnnotationGroups(ann);
      for (const item of ann.AnnotationGroupSequence) {
        const uid = item.AnnotationGroupUID;
        const style = viewer.getAnnotationGroupStyle(uid);
        const group = { uid, label: item.AnnotationGroupLabel, graphicType: item.GraphicType,
          count: Number(item.NumberOfAnnotations), color: style.color };
        state.annotationGroups.push(group);
        viewer.showAnnotationGroup(uid, { color: group.color, opacity: 1 });
        listItem("dmv-groups", `${group.label} (${group.count})`, group.color);
      }
    }
  }

  function addSegments(viewer, metadata, frameOfReference) {
    const bySeries = {};
    for (const m of metadata) {
      const seg = new DMV.metadata.Segmentation({ metadata: m });
      if (seg.FrameOfReferenceUID !== frameOfReference) continue;
      (bySeries[seg.SeriesInstanceUID] = bySeries[seg.SeriesInstanceUID] || []).push(seg);
    }
    for (const segs of Object.values(bySeries)) {
      viewer.addSegments(segs);
    }
    for (const segment of viewer.getAllSegments()) {
      state.segments.push({ uid: segment.uid, label: segment.label, number: segment.number });
      viewer.showSegment(segment.uid, { opacity: 0.75 });
      listItem("dmv-segments", `${segment.number}: ${segment.label}`);
    }
  }

  /** The newest SR's TID 1410 groups: the outline (SCOORD3D) with the group's NUM and CODE items. */
  function addReportROIs(viewer, metadata, frameOfReference) {
    if (!metadata.length) return;
    const key = (m) => `${value(m, "00080023") || ""}${value(m, "00080033") || ""}`;
    const newest = metadata.slice().sort((a, b) => (key(a) < key(b) ? -1 : 1)).pop();
    const report = DMV.metadata.formatMetadata(newest).dataset;
    const groups = [];
    const walk = (items) => {
      for (const item of items || []) {
        const name = item.ConceptNameCodeSequence && item.ConceptNameCodeSequence[0];
        if (item.ValueType === "CONTAINER" && name && name.CodeValue === MEASUREMENT_GROUP) {
          groups.push(item);
        }
        walk(item.ContentSequence);
      }
    };
    walk(report.ContentSequence);
    for (const group of groups) {
      const children = group.ContentSequence || [];
      const region = children.find((c) => c.ValueType === "SCOORD3D");
      if (!region || region.ReferencedFrameOfReferenceUID !== frameOfReference) continue;
      const data = [].concat(region.GraphicData);
      const coordinates = [];
      for (let i = 0; i + 2 < data.length; i += 3) coordinates.push([data[i], data[i + 1], data[i + 2]]);
      if (coordinates.length > 1) {
        const first = coordinates[0], last = coordinates[coordinates.length - 1];
        if (first.every((v, i) => v === last[i])) coordinates.pop(); // ROI polygons are open rings
      }
      const measurements = children.filter((c) => c.ValueType === "NUM");
      const evaluations = children.filter((c) => c.ValueType === "CODE");
      const tracking = children.find((c) => c.ValueType === "TEXT") || {};
      const scoord3d = region.GraphicType === "POINT"
        ? new DMV.scoord3d.Point({ coordinates: coordinates[0], frameOfReferenceUID: frameOfReference })
        : new DMV.scoord3d.Polygon({ coordinates, frameOfReferenceUID: frameOfReference });
      const meaning = (seq) => { const c = first(seq); return c ? c.CodeMeaning || c.CodeValue : "?"; };
      const summary = measurements.map((m) => {
        const mv = first(m.MeasuredValueSequence);
        const unit = mv ? first(mv.MeasurementUnitsCodeSequence) : null;
        const units = unit && unit.CodeValue !== "1" ? ` ${unit.CodeValue}` : "";
        return `${meaning(m.ConceptNameCodeSequence)} ${mv ? Number(mv.NumericValue).toPrecision(4) : "?"}${units}`;
      });
      const findings = evaluations.map((e) => `${meaning(e.ConceptNameCodeSequence)}: ${meaning(e.ConceptCodeSequence)}`);
      // Copies: the library adds its own measurements (a geometric area) to the arrays it gets.
      const roi = new DMV.roi.ROI({ scoord3d, properties: {
        label: tracking.TextValue || "", measurements: measurements.slice(), evaluations: evaluations.slice() } });
      try {
        // Without a style, addROI leaves the library's measurement label hidden (its own area of
        // the outline); the report's values are listed in the panel.
        viewer.addROI(roi);
        viewer.setROIStyle(roi.uid, { stroke: { color: [255, 0, 255, 1], width: 3 } });
      } catch (error) {
        state.errors.push("SR ROI: " + String(error && error.message || error));
        continue;
      }
      state.rois.push({ uid: roi.uid, label: tracking.TextValue || "", measurements: summary, findings });
      listItem("dmv-rois", `${tracking.TextValue || "region"}: ${findings.concat(summary).join("; ")}`,
        [255, 0, 255]);
    }
  }

  async function main() {
    if (!DMV || !DWC) throw new Error("dicom-microscopy-viewer or dicomweb-client did not load");
    if (!config.dicomweb || !config.study) {
      throw new Error("give the DICOMweb base URL and the study: ?dicomweb=URL&study=UID[&series=UID]");
    }
    // The library starts its decoding worker from PUBLIC_LIB_URL (default ./static/js/): the
    // folder its bundle came from.
    const bundle = document.querySelector('script[src*="dicomMicroscopyViewer"]');
    window.PUBLIC_LIB_URL = new URL("./", bundle.src).href;
    const client = new DWC.api.DICOMwebClient({ url: config.dicomweb });
    status("reading metadata…");
    const found = await studyMetadata(client);
    const seriesUID = config.series || Object.keys(found.slide)[0];
    const slideMetadata = found.slide[seriesUID];
    if (!slideMetadata) throw new Error(`no VL Whole Slide Microscopy image in series ${seriesUID}`);
    const images = slideMetadata
      .map((m) => new DMV.metadata.VLWholeSlideMicroscopyImage({ metadata: m }))
      .filter((image) => ["VOLUME", "THUMBNAIL"].includes(image.ImageType[2]));
    const frameOfReference = images[0].FrameOfReferenceUID;
    state.slide = { series: seriesUID, levels: images.length, frameOfReference,
      columns: Math.max(...images.map((i) => i.TotalPixelMatrixColumns)),
      rows: Math.max(...images.map((i) => i.TotalPixelMatrixRows)) };
    document.getElementById("dmv-slide").textContent =
      `${state.slide.columns} x ${state.slide.rows} px, ${images.length} levels`;
    el.addEventListener(DMV.events.EVENTS.FRAME_LOADING_ENDED, (event) => {
      const info = event.detail.payload || {};
      if (!info.pixelArray) return; // the error path publishes "ended" too
      if (info.sopClassUID === SOP.seg) state.segmentTilesLoaded += 1;
      else state.tilesLoaded += 1;
    });
    el.addEventListener(DMV.events.EVENTS.FRAME_LOADING_ERROR, (event) => {
      const info = event.detail.payload || {};
      if (info.sopClassUID === SOP.seg) state.segmentTilesFailed += 1;
      else state.tilesFailed += 1;
    });
    el.addEventListener(DMV.events.EVENTS.LOADING_ENDED, (event) => {
      const features = (event.detail.payload && event.detail.payload.features) || [];
      if (!features.length) return;
      const uid = features[0].get("annotationGroupUID");
      if (uid) state.annotationsLoaded[uid] = features.length;
    });
    el.addEventListener(DMV.events.EVENTS.LOADING_ERROR, (event) => {
      state.errors.push("annotations: " + String(event.detail.payload && event.detail.payload.message));
    });
    const viewer = new DMV.viewer.VolumeImageViewer({
      client, metadata: images, controls: ["overview", "position"],
      errorInterceptor: (error) => {
        state.errors.push(String((error && error.message) || error));
        return error;
      },
    });
    viewer.render({ container: el });
    state.viewer = viewer;
    Object.assign(state, api(viewer));
    status("adding annotations, segments and report…");
    await addAnnotations(viewer, client, found.ann, frameOfReference);
    addSegments(viewer, found.seg, frameOfReference);
    addReportROIs(viewer, found.sr, frameOfReference);
    state.ready = true;
    status(`${state.annotationGroups.length} annotation groups, ${state.segments.length} segments, ` +
      `${state.rois.length} report regions`);
  }

  main().catch(fail);
})();
