"""Sources for every web server."""

# The example web app, built on the controller for each machine (seed 001's build-local.nix):
# the app, then the machine's .env and images, copied into a fresh build directory under
# .flakefleet/build/<machine>/; `sh build.sh` makes dist/, shipped as /var/src/web-app-dist,
# which the example's web service serves. Rebuilt only when one of the inputs changes.
sources = {
    "web-app-dist": {
        "type": "file",
        "build": {
            "inputs": {
                ".": "example/web-app/app",
                ".env": "example/web-app/machines/{machine}/.env",
                "images": "example/web-app/machines/{machine}/images",
            },
            "command": "sh build.sh",
            "output": "dist",
        },
    },
}
