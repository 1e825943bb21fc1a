"""Create the ``default`` timeout profile from ``CHATPROXY["TIMEOUTS"]`` (or the built-in defaults).

From then on the timeouts are tuned in the admin; settings only seed this row. Values that fail
validation (system check ``chatproxy.E001``) are not copied: the built-in defaults are used.
"""

import logging

from django.apps.registry import Apps
from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor

logger = logging.getLogger("chatproxy.migrations")


def create_default(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    from chatproxy import conf, profiles
    from chatproxy.policy import Policy

    TimeoutProfile = apps.get_model("chatproxy", "TimeoutProfile")
    try:
        policy = conf.settings_policy()
        problems = [str(problem) for problem in policy.problems()]
    except (TypeError, ValueError) as exc:
        problems = [str(exc)]
    if problems:
        logger.warning("CHATPROXY['TIMEOUTS'] is invalid (%s): the default profile gets the built-in defaults",
                       "; ".join(problems))
        policy = Policy()
    TimeoutProfile.objects.using(schema_editor.connection.alias).get_or_create(
        name=profiles.DEFAULT_NAME,
        defaults={"model_pattern": profiles.DEFAULT_PATTERN, "enabled": True, **policy.profile_values()},
    )
    profiles.bump_version()


class Migration(migrations.Migration):

    dependencies = [
        ("chatproxy", "0002_timeoutprofile_streamrecord"),
    ]

    operations = [
        migrations.RunPython(create_default, migrations.RunPython.noop),
    ]
