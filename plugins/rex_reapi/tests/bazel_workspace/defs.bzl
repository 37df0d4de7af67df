"""A rule whose output is a directory (a tree artifact), to test output directories."""

def _tree_impl(ctx):
    out = ctx.actions.declare_directory(ctx.attr.name)
    ctx.actions.run_shell(
        outputs = [out],
        inputs = ctx.files.srcs,
        command = " && ".join([
            "mkdir -p {out}/nested/deeper".format(out = out.path),
            "for f in {srcs}; do cp $f {out}/; done".format(
                out = out.path,
                srcs = " ".join([f.path for f in ctx.files.srcs]),
            ),
            "echo nested > {out}/nested/deeper/leaf.txt".format(out = out.path),
            "printf '#!/bin/sh\\necho tool\\n' > {out}/tool.sh && chmod +x {out}/tool.sh".format(out = out.path),
            "ln -s leaf.txt {out}/nested/deeper/link".format(out = out.path),
        ]),
    )
    return [DefaultInfo(files = depset([out]))]

tree = rule(
    implementation = _tree_impl,
    attrs = {"srcs": attr.label_list(allow_files = True)},
)
