// A small syntax highlighter for code blocks, written for this page: one regular expression per
// language whose alternatives are the token kinds (comment, string, number, keyword, ...).
// It returns DOM nodes (text nodes and <span class="hl-KIND">), never HTML strings, so the
// code is always shown as text. Unknown languages come back as plain text.

const END = "(?![\\s\\S])"; // the end of the input: an unclosed string or comment runs to it

const C_KEYWORDS =
  "abstract as async await auto break case catch char class const constexpr continue crate " +
  "default defer delete do double dyn else enum explicit export extends extern false final " +
  "finally float fn for func go goto if impl implements import in include inline instanceof " +
  "int interface internal let long loop match mod move mut namespace new nil noexcept null " +
  "nullptr object operator override package private protected pub public readonly ref " +
  "register return select self Self short signed sizeof static struct super switch " +
  "synchronized template this throw throws trait true try type typedef typename union " +
  "unsafe unsigned use using val var virtual void volatile where while yield";

const JS_KEYWORDS =
  "as async await break case catch class const continue debugger default delete do else " +
  "enum export extends false finally for from function get if implements import in " +
  "instanceof interface let new null of private protected public readonly return set " +
  "static super switch this throw true try type typeof undefined var void while with yield";

const PY_KEYWORDS =
  "and as assert async await break case class continue def del elif else except finally " +
  "for from global if import in is lambda match nonlocal not or pass raise return try while " +
  "with yield";

const SH_KEYWORDS =
  "if then else elif fi for while until do done case esac function in return local export " +
  "readonly declare unset shift exit source alias cd echo printf set trap";

const SQL_KEYWORDS =
  "select from where and or not insert into values update set delete create table drop " +
  "alter add index primary key foreign references join left right inner outer full on as " +
  "group by order having limit offset distinct union all exists in is null like between " +
  "case when then else end asc desc count sum avg min max with returning default unique";

function words(list) {
  return `\\b(?:${list.trim().split(/\s+/).join("|")})\\b`;
}

const NUMBER = "\\b(?:0[xX][\\da-fA-F_]+|0[bBoO][0-7_]+|\\d[\\d_]*(?:\\.\\d[\\d_]*)?(?:[eE][+-]?\\d+)?)" +
  "[a-zA-Z]{0,3}\\b";
const DQ = `"(?:\\\\.|[^"\\\\\\n])*(?:"|$)`;
const SQ = `'(?:\\\\.|[^'\\\\\\n])*(?:'|$)`;
const BLOCK_COMMENT = `/\\*[\\s\\S]*?(?:\\*/|${END})`;
const CALL = "\\b[A-Za-z_$][\\w$]*(?=\\s*\\()";

const LANGS = new Map();

function define(names, rules, flags = "gm") {
  const regex = new RegExp(rules.map(([, source]) => `(${source})`).join("|"), flags);
  const kinds = rules.map(([kind]) => kind);
  for (const name of names.split(" ")) LANGS.set(name, { regex, kinds });
}

define("python py python3 py3", [
  ["comment", "#.*"],
  ["string", `[rRbBuUfF]{0,2}(?:"""[\\s\\S]*?(?:"""|${END})|'''[\\s\\S]*?(?:'''|${END})|${DQ}|${SQ})`],
  ["meta", "^[ \\t]*@[\\w.]+"],
  ["keyword", words(PY_KEYWORDS)],
  ["literal", words("True False None self cls")],
  ["number", NUMBER],
  ["title", "(?<=\\b(?:def|class)\\s+)\\w+"],
  ["call", CALL],
]);

define("javascript js jsx mjs cjs typescript ts tsx", [
  ["comment", `//.*|${BLOCK_COMMENT}`],
  ["string", `${DQ}|${SQ}|\`(?:\\\\[\\s\\S]|[^\`\\\\])*(?:\`|${END})`],
  ["keyword", words(JS_KEYWORDS)],
  ["number", NUMBER],
  ["title", "(?<=\\b(?:function|class)\\s+)[\\w$]+"],
  ["call", CALL],
]);

define("json jsonc json5", [
  ["comment", `//.*|${BLOCK_COMMENT}`],
  ["attr", `${DQ}(?=\\s*:)`],
  ["string", DQ],
  ["literal", words("true false null")],
  ["number", "-?\\b\\d+(?:\\.\\d+)?(?:[eE][+-]?\\d+)?\\b"],
]);

define("c h cpp c++ cc cxx hpp java cs csharp go golang rust rs swift kotlin kt scala zig", [
  ["comment", `//.*|${BLOCK_COMMENT}`],
  ["meta", "^[ \\t]*#[ \\t]*\\w+"],
  ["string", `${DQ}|'(?:\\\\.|[^'\\\\\\n]){1,8}'|\`[^\`]*(?:\`|${END})`],
  ["keyword", words(C_KEYWORDS)],
  ["number", NUMBER],
  ["call", CALL],
]);

define("bash sh shell zsh console shellsession", [
  ["comment", "(?:^|(?<=\\s))#.*"],
  ["string", `${DQ}|'[^']*(?:'|${END})`],
  ["variable", "\\$\\{[^}\\n]*\\}|\\$[\\w@#?$!*-]"],
  ["keyword", words(SH_KEYWORDS)],
  ["meta", "^\\$(?= )"],
  ["number", "\\b\\d+\\b"],
]);

define("sql", [
  ["comment", `--.*|${BLOCK_COMMENT}`],
  ["string", SQ],
  ["keyword", words(SQL_KEYWORDS)],
  ["number", NUMBER],
], "gmi");

define("yaml yml toml ini", [
  ["comment", "#.*"],
  ["meta", "^[ \\t]*\\[[^\\]\\n]*\\]"],
  ["attr", "^[ \\t-]*[\\w.\"'-]+(?=[ \\t]*[:=])"],
  ["string", `${DQ}|${SQ}`],
  ["literal", words("true false null yes no on off")],
  ["number", NUMBER],
]);

define("html xml svg xhtml vue", [
  ["comment", `<!--[\\s\\S]*?(?:-->|${END})`],
  ["keyword", "</?[\\w:-]+|/?>"],
  ["attr", "\\b[\\w:-]+(?==)"],
  ["string", `"[^"]*(?:"|${END})|'[^']*(?:'|${END})`],
]);

define("css scss less", [
  ["comment", BLOCK_COMMENT],
  ["string", `${DQ}|${SQ}`],
  ["attr", "[\\w-]+(?=\\s*:[^:])"],
  ["number", "#[\\da-fA-F]{3,8}\\b|-?\\b\\d+(?:\\.\\d+)?(?:px|em|rem|%|vh|vw|s|ms|deg)?"],
  ["keyword", "@[\\w-]+|!important"],
]);

define("diff patch", [
  ["meta", "^@@.*"],
  ["inserted", "^\\+.*"],
  ["deleted", "^-.*"],
]);

/** The languages it knows (names and aliases). */
export function languages() {
  return [...LANGS.keys()];
}

/** A DocumentFragment showing `code`, highlighted when `lang` is known. */
export function highlight(code, lang) {
  const fragment = document.createDocumentFragment();
  const spec = LANGS.get(String(lang || "").toLowerCase());
  if (!spec) {
    fragment.append(document.createTextNode(code));
    return fragment;
  }
  const regex = new RegExp(spec.regex.source, spec.regex.flags);
  let last = 0;
  let m;
  while ((m = regex.exec(code)) !== null) {
    if (m[0] === "") {
      regex.lastIndex++;
      continue;
    }
    if (m.index > last) fragment.append(document.createTextNode(code.slice(last, m.index)));
    const group = m.findIndex((value, k) => k > 0 && value !== undefined);
    const span = document.createElement("span");
    span.className = `hl-${spec.kinds[group - 1]}`;
    span.textContent = m[0];
    fragment.append(span);
    last = m.index + m[0].length;
  }
  if (last < code.length) fragment.append(document.createTextNode(code.slice(last)));
  return fragment;
}
