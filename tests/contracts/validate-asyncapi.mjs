// Validates AsyncAPI documents with the ecosystem's own parser (@asyncapi/parser), as
// tests/it/contracts.rs asks: `node validate-asyncapi.mjs FILE...`. Prints every diagnostic of
// severity error (0) or warning (1) as `FILE: severity path: message`; exits 1 if any file has
// an error, 0 otherwise.
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const parser = new Parser();
let failed = false;
for (const file of process.argv.slice(2)) {
  const text = readFileSync(file, "utf8");
  const { document, diagnostics } = await parser.parse(text, { source: file });
  for (const d of diagnostics) {
    if (d.severity > 1) continue;
    const level = d.severity === 0 ? "error" : "warning";
    console.log(`${file}: ${level} ${d.code} at ${JSON.stringify(d.path)}: ${d.message}`);
  }
  if (!document || diagnostics.some((d) => d.severity === 0)) {
    failed = true;
  } else {
    console.log(`${file}: valid AsyncAPI ${document.version()} (${document.channels().length} channels, ${document.operations().length} operations, ${document.components().messages().length} component messages)`);
  }
}
process.exit(failed ? 1 : 0);
