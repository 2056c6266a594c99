// A hand-drawn SVG line chart of training and validation loss against step: two series, nice
// axis ticks, one redraw per animation frame however many events arrive. Lighter than vendoring a
// charting library for two lines.

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 600;
const HEIGHT = 260;
const PAD = { left: 52, right: 14, top: 14, bottom: 36 };
const SERIES = [
  { name: "train", label: "train loss", radius: 2 },
  { name: "val", label: "validation loss", radius: 4 },
];

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

// About `count` round tick values (1, 2 or 5 times a power of ten) covering [lo, hi].
export function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

export class LossChart {
  constructor(node) {
    this.node = node;
    this.node.setAttribute("viewBox", `0 0 ${WIDTH} ${HEIGHT}`);
    this.maxStep = 0; // the job's total steps, when known: the x axis does not rescale as it fills
    this.clear();
  }

  clear() {
    this.points = { train: new Map(), val: new Map() }; // step -> loss; a later value at a step replaces it
    this.maxStep = 0;
    this.draw();
  }

  add(series, step, loss) {
    if (typeof step !== "number" || typeof loss !== "number" || !Number.isFinite(loss)) return;
    this.points[series].set(step, loss);
    this.schedule();
  }

  setMaxStep(steps) {
    if (typeof steps === "number" && steps > this.maxStep) this.maxStep = steps;
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = null;
      this.draw();
    });
  }

  sorted(series) {
    return [...this.points[series].entries()].sort((a, b) => a[0] - b[0]);
  }

  draw() {
    const data = Object.fromEntries(SERIES.map((s) => [s.name, this.sorted(s.name)]));
    const all = [...data.train, ...data.val];
    this.node.dataset.trainPoints = String(data.train.length);
    this.node.dataset.valPoints = String(data.val.length);
    if (!all.length) {
      this.node.replaceChildren(svg("text", { x: WIDTH / 2, y: HEIGHT / 2, class: "empty" }, "waiting for the first step…"));
      return;
    }
    const losses = all.map(([, loss]) => loss);
    let [lo, hi] = [Math.min(...losses), Math.max(...losses)];
    const margin = (hi - lo) * 0.08 || Math.abs(hi) * 0.05 || 0.5;
    [lo, hi] = [Math.max(0, lo - margin), hi + margin];
    const xMax = Math.max(this.maxStep, ...all.map(([step]) => step), 1);
    const x = (step) => PAD.left + (step / xMax) * (WIDTH - PAD.left - PAD.right);
    const y = (loss) => HEIGHT - PAD.bottom - ((loss - lo) / (hi - lo)) * (HEIGHT - PAD.top - PAD.bottom);
    this.node.replaceChildren(this.axes(x, y, lo, hi, xMax), ...SERIES.map((s) => this.line(s, data[s.name], x, y)));
  }

  axes(x, y, lo, hi, xMax) {
    const group = svg("g", { class: "axes" });
    for (const tick of niceTicks(lo, hi, 5)) {
      group.append(
        svg("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(tick), y2: y(tick), class: "grid" }),
        svg("text", { x: PAD.left - 6, y: y(tick) + 4, class: "tick y" }, String(tick)),
      );
    }
    for (const tick of niceTicks(0, xMax, 6)) {
      group.append(svg("text", { x: x(tick), y: HEIGHT - PAD.bottom + 16, class: "tick x" }, String(tick)));
    }
    const bottom = HEIGHT - PAD.bottom;
    group.append(
      svg("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: bottom, y2: bottom, class: "axis" }),
      svg("text", { x: (PAD.left + WIDTH - PAD.right) / 2, y: HEIGHT - 4, class: "title" }, "step"),
      svg("text", { x: 12, y: PAD.top + 4, class: "title", transform: `rotate(-90 12 ${PAD.top + 4})` }, "loss"),
    );
    return group;
  }

  line(series, points, x, y) {
    const group = svg("g", { class: `series ${series.name}` });
    group.append(svg("title", {}, series.label));
    if (points.length > 1) {
      group.append(svg("polyline", { points: points.map(([s, l]) => `${x(s)},${y(l)}`).join(" ") }));
    }
    for (const [step, loss] of points) {
      const dot = svg("circle", { cx: x(step), cy: y(loss), r: series.radius });
      dot.append(svg("title", {}, `${series.label} ${loss.toFixed(3)} at step ${step}`));
      group.append(dot);
    }
    return group;
  }
}
