"use strict";
// Follows the balancer's /events: a "state" frame on every (re)connection,
// "change" frames as instances join, leave, drain or are ejected, and a
// "stats" frame each second some figure changed. Ages count on here between
// frames.
(function () {
  const servicesEl = document.getElementById("services");
  const eventsEl = document.getElementById("events");
  const linkEl = document.getElementById("link");
  const MAX_EVENTS = 100;
  const SYMBOL = { live: "●", draining: "◐", ejected: "✕" };
  const KIND_SYMBOL = { joined: "+", back: "↺", left: "−", ejected: "✕", drained: "◐" };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    for (const child of children) node.append(child);
    return node;
  }

  function age(seconds) {
    if (seconds < 60) return seconds + " s";
    const m = Math.floor(seconds / 60), h = Math.floor(m / 60), d = Math.floor(h / 24);
    if (d > 0) return d + " d " + (h % 24) + " h";
    if (h > 0) return h + " h " + (m % 60) + " min";
    return m + " min " + (seconds % 60) + " s";
  }

  function latency(ms) {
    if (ms === null || ms === undefined) return "—";
    return ms < 10 ? ms.toFixed(2) + " ms" : ms < 1000 ? ms.toFixed(0) + " ms" : (ms / 1000).toFixed(1) + " s";
  }

  function row(instance) {
    const state = el("td", { class: "state state-" + instance.state },
      el("span", { "aria-hidden": "true" }, SYMBOL[instance.state] + " "), instance.state);
    if (instance.override) state.append(el("div", { class: "muted override" }, instance.override));
    const tags = el("td", { class: "tags" });
    if (instance.tags.length === 0) tags.append(el("span", { class: "muted" }, "—"));
    for (const tag of instance.tags) tags.append(el("span", { class: "tag" }, tag));
    return el("tr", { "data-instance": instance.id, "data-state": instance.state, class: "state-row-" + instance.state },
      el("th", { scope: "row" }, instance.id),
      el("td", {}, instance.address),
      el("td", { class: "num" }, String(instance.weight)),
      tags,
      el("td", { class: "num age", "data-age": String(instance.age_s) }, age(instance.age_s)),
      state,
      el("td", { class: "num rate" }, instance.rate.toFixed(1)),
      el("td", { class: "num p99" }, latency(instance.p99_ms)));
  }

  function renderServices(services) {
    const sections = services.map((service) => {
      const counts = {};
      for (const i of service.instances) counts[i.state] = (counts[i.state] || 0) + 1;
      const summary = service.instances.length + " instance" + (service.instances.length === 1 ? "" : "s") +
        Object.entries(counts).filter(([s]) => s !== "live").map(([s, n]) => ", " + n + " " + s).join("");
      const title = el("h2", { id: "service-" + service.service }, service.service + " ",
        el("small", { title: "catalog revision " + service.revision }, summary));
      if (service.instances.length === 0) {
        return el("section", { "aria-labelledby": "service-" + service.service, "data-service": service.service },
          title, el("p", { class: "empty" }, "No live instance: requests get a 503."));
      }
      const head = el("tr", {}, ...["Instance", "Address", "Weight", "Tags", "Age", "State", "Requests/s", "p99"].map(
        (name, i) => el("th", { scope: "col", class: [2, 4, 6, 7].includes(i) ? "num" : "" }, name)));
      const table = el("table", {}, el("thead", {}, head), el("tbody", {}, ...service.instances.map(row)));
      return el("section", { "aria-labelledby": "service-" + service.service, "data-service": service.service }, title, table);
    });
    servicesEl.replaceChildren(...sections);
    renderedAt = Date.now();
  }

  let renderedAt = Date.now();
  setInterval(() => {
    const since = Math.floor((Date.now() - renderedAt) / 1000);
    for (const cell of servicesEl.querySelectorAll("td.age")) {
      cell.textContent = age(Number(cell.dataset.age) + since);
    }
  }, 1000);

  function addEvents(events) {
    for (const event of events) {
      const when = new Date(event.at_ms);
      const item = el("li", { "data-kind": event.kind },
        el("time", { datetime: when.toISOString() }, when.toLocaleTimeString([], { hourCycle: "h23" })),
        el("span", { class: "kind kind-" + event.kind },
          el("span", { "aria-hidden": "true" }, (KIND_SYMBOL[event.kind] || "") + " "), event.kind),
        el("span", {}, event.service + " / " + event.instance),
        el("span", { class: "muted" }, event.detail));
      eventsEl.prepend(item);
    }
    while (eventsEl.children.length > MAX_EVENTS) eventsEl.lastElementChild.remove();
  }

  function link(state, text) {
    linkEl.dataset.state = state;
    linkEl.replaceChildren(el("span", { "aria-hidden": "true" }, state === "live" ? "● " : "○ "), text);
  }

  const source = new EventSource("events");
  source.addEventListener("state", (message) => {
    const data = JSON.parse(message.data);
    eventsEl.replaceChildren();
    addEvents(data.events);
    renderServices(data.services);
    link("live", "live");
  });
  source.addEventListener("change", (message) => {
    const data = JSON.parse(message.data);
    addEvents(data.events);
    renderServices(data.services);
  });
  source.addEventListener("stats", (message) => renderServices(JSON.parse(message.data).services));
  source.addEventListener("error", () => link("lost", "connection lost; reconnecting…"));
})();
