// A small Markdown renderer for model output, written for this page.
//
// Safety by construction: it builds DOM nodes (createElement + text nodes) and never parses
// HTML, so markup in the model's output is shown as text, never run. Links keep only http:,
// https: and mailto: targets; images are shown as links (the page loads nothing the model
// names). It renders unfinished input sensibly (an unclosed code fence is code up to the end),
// since it runs again on every streamed delta.
//
// Supported: ATX headings, paragraphs, fenced code (highlighted), indented-free lists (bullet
// and ordered, nested by indentation), block quotes, tables (GitHub style), horizontal rules;
// inline code, **strong**, *emphasis*, ~~strike~~, links, autolinks, hard breaks, escapes.

import { highlight } from "./highlight.js";

const FENCE = /^ {0,3}(`{3,}|~{3,})[ \t]*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])([ \t]+|$)(.*)$/;
const TABLE_RULE = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
const SAFE_URL = /^(https?:\/\/|mailto:)/i;

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

/** Render `source` into `target`, replacing its children. */
export function renderMarkdown(target, source) {
  target.replaceChildren(markdownToFragment(source));
}

/** A DocumentFragment for `source`. */
export function markdownToFragment(source) {
  const fragment = document.createDocumentFragment();
  const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
  renderBlocks(lines, fragment, 0);
  return fragment;
}

function isBlank(line) {
  return /^\s*$/.test(line);
}

function indentOf(line) {
  return line.length - line.trimStart().length;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
    ITEM.test(line);
}

function renderBlocks(lines, parent, depth) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (isBlank(line)) {
      i++;
      continue;
    }
    let m;
    if ((m = FENCE.exec(line))) {
      const fence = m[1];
      const indent = indentOf(line);
      const body = [];
      i++;
      while (i < lines.length) {
        const close = lines[i].trim();
        if (close.startsWith(fence) && close.replaceAll(fence[0], "") === "" &&
            indentOf(lines[i]) < 4) {
          i++;
          break;
        }
        body.push(lines[i].slice(Math.min(indent, indentOf(lines[i]))));
        i++;
      }
      parent.append(codeBlock(body.join("\n"), m[2]));
      continue;
    }
    if ((m = HEADING.exec(line))) {
      const h = el(`h${m[1].length}`);
      renderInline(m[2] || "", h);
      parent.append(h);
      i++;
      continue;
    }
    if (RULE.test(line)) {
      parent.append(el("hr"));
      i++;
      continue;
    }
    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && !isBlank(lines[i])) {
        const q = QUOTE.exec(lines[i]);
        inner.push(q ? q[1] : lines[i]);
        i++;
      }
      const quote = el("blockquote");
      if (depth < 8) renderBlocks(inner, quote, depth + 1);
      else renderInline(inner.join("\n"), quote);
      parent.append(quote);
      continue;
    }
    if (ITEM.test(line)) {
      i = renderList(lines, i, parent, depth);
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) &&
        splitRow(lines[i + 1]).length === splitRow(line).length) {
      i = renderTable(lines, i, parent);
      continue;
    }
    const para = [];
    while (i < lines.length && !isBlank(lines[i]) && (para.length === 0 || !startsBlock(lines[i]))) {
      para.push(lines[i]);
      i++;
    }
    const p = el("p");
    renderInline(para.map((l) => l.replace(/^ +/, "")).join("\n"), p);
    parent.append(p);
  }
}

function renderList(lines, start, parent, depth) {
  const first = ITEM.exec(lines[start]);
  const ordered = /\d/.test(first[2]);
  const list = el(ordered ? "ol" : "ul");
  if (ordered) {
    const n = parseInt(first[2], 10);
    if (n !== 1) list.start = n;
  }
  const baseIndent = first[1].length;
  let i = start;
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length !== baseIndent || /\d/.test(m[2]) !== ordered) break;
    const contentIndent = m[1].length + m[2].length + Math.max(1, Math.min(m[3].length, 4));
    const body = [m[4]];
    i++;
    while (i < lines.length) {
      const line = lines[i];
      if (isBlank(line)) {
        // A blank line continues the item only when the next line is indented under it.
        if (i + 1 < lines.length && !isBlank(lines[i + 1]) &&
            indentOf(lines[i + 1]) >= contentIndent) {
          body.push("");
          i++;
          continue;
        }
        break;
      }
      if (indentOf(line) >= contentIndent) {
        body.push(line.slice(contentIndent));
      } else if (ITEM.test(line) && indentOf(line) > baseIndent) {
        body.push(line.slice(Math.min(indentOf(line), contentIndent)));
      } else if (!startsBlock(line) && !ITEM.test(line)) {
        body.push(line.trimStart()); // a lazy continuation of the item's paragraph
      } else {
        break;
      }
      i++;
    }
    const li = el("li");
    const loose = body.some((l, k) => isBlank(l) && k < body.length - 1);
    if (!loose && !body.slice(1).some((l) => startsBlock(l))) {
      renderInline(body.join("\n"), li);
    } else if (depth < 8) {
      renderBlocks(body, li, depth + 1);
    } else {
      renderInline(body.join("\n"), li);
    }
    list.append(li);
    // Items of one list may be separated by a blank line.
    if (i < lines.length && isBlank(lines[i]) && i + 1 < lines.length) {
      const next = ITEM.exec(lines[i + 1]);
      if (next && next[1].length === baseIndent && /\d/.test(next[2]) === ordered) i++;
    }
  }
  parent.append(list);
  return i;
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  const cells = [];
  let cell = "";
  let code = false;
  for (let k = 0; k < row.length; k++) {
    const ch = row[k];
    if (ch === "\\" && row[k + 1] === "|") {
      cell += "|";
      k++;
    } else if (ch === "`") {
      code = !code;
      cell += ch;
    } else if (ch === "|" && !code) {
      cells.push(cell.trim());
      cell = "";
    } else {
      cell += ch;
    }
  }
  cells.push(cell.trim());
  return cells;
}

function renderTable(lines, start, parent) {
  const head = splitRow(lines[start]);
  const aligns = splitRow(lines[start + 1]).map((c) =>
    c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" :
      c.startsWith(":") ? "left" : "");
  const wrap = el("div", "table-wrap");
  const table = el("table");
  const thead = el("thead");
  const tr = el("tr");
  head.forEach((text, k) => {
    const th = el("th");
    if (aligns[k]) th.className = `align-${aligns[k]}`;
    renderInline(text, th);
    tr.append(th);
  });
  thead.append(tr);
  table.append(thead);
  const tbody = el("tbody");
  let i = start + 2;
  while (i < lines.length && !isBlank(lines[i]) && lines[i].includes("|")) {
    const cells = splitRow(lines[i]);
    const row = el("tr");
    for (let k = 0; k < head.length; k++) {
      const td = el("td");
      if (aligns[k]) td.className = `align-${aligns[k]}`;
      renderInline(cells[k] ?? "", td);
      row.append(td);
    }
    tbody.append(row);
    i++;
  }
  table.append(tbody);
  wrap.append(table);
  parent.append(wrap);
  return i;
}

/** A code block: a header with the language and a copy button, then the highlighted code. */
export function codeBlock(code, lang) {
  const block = el("div", "code-block");
  const head = el("div", "code-head");
  const name = el("span", "code-lang");
  name.textContent = lang || "text";
  const copy = el("button", "copy");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.title = "Copy the code";
  head.append(name, copy);
  const pre = el("pre");
  const codeEl = el("code");
  if (lang) codeEl.dataset.lang = lang.toLowerCase();
  codeEl.append(highlight(code, lang));
  pre.append(codeEl);
  block.append(head, pre);
  return block;
}

// -- inline ------------------------------------------------------------------------------------

const PUNCT = /[!-/:-@[-`{-~]/;

function renderInline(text, parent) {
  parseInline(text, parent, 0);
}

function safeHref(url) {
  const trimmed = url.trim();
  return SAFE_URL.test(trimmed) ? trimmed : null;
}

function link(href, parent, label, depth) {
  const a = el("a");
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  if (typeof label === "string") parseInline(label, a, depth + 1);
  else a.textContent = href;
  parent.append(a);
}

// Find the `]` that closes the `[` at `open`, counting nested brackets and skipping escapes.
function closingBracket(text, open) {
  let level = 0;
  for (let k = open; k < text.length; k++) {
    const ch = text[k];
    if (ch === "\\") k++;
    else if (ch === "`") {
      const end = text.indexOf("`", k + 1);
      if (end < 0) return -1;
      k = end;
    } else if (ch === "[") level++;
    else if (ch === "]" && --level === 0) return k;
  }
  return -1;
}

// A delimiter run `delim` at `i` may open when followed by a non-space; find its closer.
function findCloser(text, i, delim) {
  const after = text[i + delim.length];
  if (after === undefined || /\s/.test(after)) return -1;
  if (delim[0] === "_" && i > 0 && /[\p{L}\p{N}]/u.test(text[i - 1])) return -1;
  let k = i + delim.length + 1;
  while (k <= text.length - delim.length) {
    const at = text.indexOf(delim, k);
    if (at < 0) return -1;
    const before = text[at - 1];
    const next = text[at + delim.length];
    const wordAfter = delim[0] === "_" && next !== undefined && /[\p{L}\p{N}]/u.test(next);
    // Skip `**` when looking for a single `*` closer (it belongs to a nested strong run).
    const doubled = delim.length === 1 && next === delim;
    if (before !== "\\" && !/\s/.test(before) && !wordAfter && !doubled) return at;
    k = at + (doubled ? 2 : 1);
  }
  return -1;
}

function parseInline(text, parent, depth) {
  let plain = "";
  const flush = () => {
    if (plain) parent.append(document.createTextNode(plain));
    plain = "";
  };
  let i = 0;
  while (i < text.length) {
    const ch = text[i];
    if (ch === "\\" && i + 1 < text.length) {
      const next = text[i + 1];
      if (next === "\n") {
        flush();
        parent.append(el("br"));
        i += 2;
        continue;
      }
      if (PUNCT.test(next)) {
        plain += next;
        i += 2;
        continue;
      }
    }
    if (ch === "\n") {
      if (plain.endsWith("  ")) {
        plain = plain.replace(/ +$/, "");
        flush();
        parent.append(el("br"));
      } else {
        plain = plain.replace(/ +$/, "") + "\n";
      }
      i++;
      continue;
    }
    if (ch === "`") {
      let n = 1;
      while (text[i + n] === "`") n++;
      const fence = "`".repeat(n);
      let end = text.indexOf(fence, i + n);
      while (end >= 0 && text[end + n] === "`") {
        let skip = end;
        while (text[skip] === "`") skip++;
        end = text.indexOf(fence, skip);
      }
      if (end >= 0) {
        flush();
        let inner = text.slice(i + n, end).replace(/\n/g, " ");
        if (inner.length > 2 && inner.startsWith(" ") && inner.endsWith(" ") && inner.trim()) {
          inner = inner.slice(1, -1);
        }
        const code = el("code");
        code.textContent = inner;
        parent.append(code);
        i = end + n;
        continue;
      }
      plain += fence;
      i += n;
      continue;
    }
    if (depth < 12 && (ch === "[" || (ch === "!" && text[i + 1] === "["))) {
      const open = ch === "!" ? i + 1 : i;
      const close = closingBracket(text, open);
      if (close > 0 && text[close + 1] === "(") {
        const end = text.indexOf(")", close + 2);
        if (end > 0) {
          const target = text.slice(close + 2, end).trim().split(/\s+/)[0] || "";
          const href = safeHref(target.replace(/^<|>$/g, ""));
          const label = text.slice(open + 1, close);
          flush();
          if (href) link(href, parent, ch === "!" ? label || href : label, depth);
          else parseInline(label, parent, depth + 1); // unsafe or relative target: just text
          i = end + 1;
          continue;
        }
      }
    }
    if (ch === "<") {
      const m = /^<((?:https?:\/\/|mailto:)[^\s<>]+)>/i.exec(text.slice(i));
      if (m) {
        flush();
        link(m[1], parent, null, depth);
        i += m[0].length;
        continue;
      }
    }
    if (ch === "h" && (i === 0 || /[\s(]/.test(text[i - 1]))) {
      const m = /^https?:\/\/[^\s<>()]+[^\s<>().,;:!?'"*_~]/.exec(text.slice(i));
      if (m) {
        flush();
        link(m[0], parent, null, depth);
        i += m[0].length;
        continue;
      }
    }
    if (depth < 12 && (ch === "*" || ch === "_" || ch === "~")) {
      const double = text[i + 1] === ch;
      if (ch === "~" && !double) {
        plain += ch;
        i++;
        continue;
      }
      const delim = double ? ch + ch : ch;
      const close = findCloser(text, i, delim);
      if (close > 0) {
        flush();
        const node = el(ch === "~" ? "del" : double ? "strong" : "em");
        parseInline(text.slice(i + delim.length, close), node, depth + 1);
        parent.append(node);
        i = close + delim.length;
        continue;
      }
      plain += delim;
      i += delim.length;
      continue;
    }
    plain += ch;
    i++;
  }
  flush();
}
