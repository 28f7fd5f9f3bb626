// Build the dashboard into src/web/assets/ (embedded by the hub binary):
//   app.js     esbuild bundle of src/main.ts (minified)
//   app.css    src/app.css
//   index.html index.html
//   BUILD_HASH sha256 over the sources below, so that a test can tell when
//              the committed bundle is older than its sources.
// `node build.mjs --check` only compares the hash.

import { createHash } from "node:crypto";
import { copyFileSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join, relative } from "node:path";
import { fileURLToPath } from "node:url";

const web = fileURLToPath(new URL(".", import.meta.url));
const repo = join(web, "..");
const out = join(repo, "src/web/assets");

/** Every file the bundle is made from, as repo-relative paths, sorted. */
export function sources() {
  const files = [];
  const walk = (dir) => {
    for (const name of readdirSync(dir)) {
      const p = join(dir, name);
      if (statSync(p).isDirectory()) walk(p);
      else files.push(p);
    }
  };
  walk(join(web, "src"));
  for (const f of ["index.html", "build.mjs", "package.json", "package-lock.json", "buf.gen.yaml", "tsconfig.json"]) files.push(join(web, f));
  files.push(join(repo, "proto/agenthub/v1/hub.proto"));
  return files.map((f) => relative(repo, f).split("\\").join("/")).sort();
}

/** `sha256sum`-style lines ("<hex>  <path>\n") for every source, hashed. */
export function sourceHash() {
  const lines = sources()
    .map((p) => `${createHash("sha256").update(readFileSync(join(repo, p))).digest("hex")}  ${p}\n`)
    .join("");
  return createHash("sha256").update(lines).digest("hex");
}

const hash = sourceHash();
if (process.argv.includes("--check")) {
  const built = readFileSync(join(out, "BUILD_HASH"), "utf8").trim();
  if (built !== hash) {
    console.error(`src/web/assets is stale: built from ${built}, sources are ${hash}. Run: cd web && npm ci && npm run build`);
    process.exit(1);
  }
  console.log("src/web/assets is up to date");
} else {
  const esbuild = await import("esbuild");
  await esbuild.build({
    entryPoints: [join(web, "src/main.ts")],
    bundle: true,
    minify: true,
    format: "iife",
    target: ["es2022"],
    legalComments: "none",
    outfile: join(out, "app.js"),
    logLevel: "warning",
  });
  copyFileSync(join(web, "src/app.css"), join(out, "app.css"));
  copyFileSync(join(web, "index.html"), join(out, "index.html"));
  writeFileSync(join(out, "BUILD_HASH"), `${hash}\n`);
  console.log(`built src/web/assets (${hash.slice(0, 12)})`);
}
